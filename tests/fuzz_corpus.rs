//! Replays every file of the fuzz seed corpus (`fuzz/corpus/<target>/`)
//! through the functions the cargo-fuzz targets call, so a regression is
//! caught by `cargo test` on stable Rust, without libFuzzer.

use std::fs;
use std::path::PathBuf;

use exproto_adapter::protocol::chat::fuzz;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = fs::read(&p).expect("corpus file");
            (p, data)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

#[test]
fn decode_line_corpus() {
    for (path, data) in corpus("decode_line") {
        let r = std::panic::catch_unwind(|| fuzz::decode_line(&data));
        assert!(r.is_ok(), "decode_line failed on {}", path.display());
    }
}

#[test]
fn run_session_corpus() {
    for (path, data) in corpus("run_session") {
        let r = std::panic::catch_unwind(|| fuzz::run_session(&data));
        assert!(r.is_ok(), "run_session failed on {}", path.display());
    }
}
