//! GGUF file -> plan (llama family).
use crate::plan::Plan;
use crate::{Error, Result};
use std::path::Path;

pub fn plan_from_gguf(path: &Path) -> Result<Plan> {
    Err(Error::format(path, "GGUF import is not available yet"))
}
