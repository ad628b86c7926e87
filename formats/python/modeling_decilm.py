"""NVIDIA's nemotron-nas layout (`DeciLMForCausalLM`) run by surgeon's model (modeling_surgeon.py).

Written by surgeon beside config.json (formats/python/modeling_decilm.py in the surgeon repository).
"""
from .configuration_decilm import DeciLMConfig
from .modeling_surgeon import SurgeonForCausalLM


class DeciLMForCausalLM(SurgeonForCausalLM):
    config_class = DeciLMConfig
