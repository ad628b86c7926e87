//! Writes a synthetic Llama checkpoint for benchmarks (scripts/bench-surgery.sh).
//!
//! `cargo run --release -p surgeon-surgery --example synthetic_checkpoint -- DIR [1b|tiny] [SHARD]`
use surgeon_formats::synthetic::SyntheticSpec;
use surgeon_formats::writer::parse_size;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .first()
        .ok_or("usage: synthetic_checkpoint DIR [1b|tiny] [SHARD_SIZE]")?;
    let spec = match args.get(1).map(String::as_str).unwrap_or("1b") {
        "1b" => SyntheticSpec::llama_1b(),
        "tiny" => SyntheticSpec::tiny(),
        other => return Err(format!("unknown size `{other}` (1b or tiny)").into()),
    };
    let shard = args.get(2).map(|s| parse_size(s)).transpose()?;
    let t = std::time::Instant::now();
    spec.write(std::path::Path::new(dir), shard)?;
    eprintln!(
        "wrote {dir}: {} parameters in {:.1}s",
        spec.plan().parameter_count(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
