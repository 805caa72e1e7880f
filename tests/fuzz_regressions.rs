//! Replays every saved fuzz input (fuzz/regressions/<target>/*) through the target's body in
//! `shardmq::fuzzing`, on stable Rust: each crash or hang the fuzzer found, once fixed, stays
//! fixed. See fuzz/README.md for running the fuzzers themselves.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
        let data = std::fs::read(&path).expect("a saved input");
        run(&data);
        replayed += 1;
    }
    assert!(replayed > 0, "no saved inputs for {target}");
}

#[test]
fn frame_decoder() {
    replay("frame_decoder", shardmq::fuzzing::frame_decoder);
}

#[test]
fn method_decoder() {
    replay("method_decoder", shardmq::fuzzing::method_decoder);
}

#[test]
fn field_table() {
    replay("field_table", shardmq::fuzzing::field_table);
}

#[test]
fn content_header() {
    replay("content_header", shardmq::fuzzing::content_header);
}

#[test]
fn connection_machine() {
    replay("connection_machine", shardmq::fuzzing::connection_machine);
}
