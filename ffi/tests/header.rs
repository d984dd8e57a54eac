//! `include/shmcluster.h` is what cbindgen makes of `src/` today.
//!
//! Regenerate it with
//! `SHMC_REGEN_HEADER=1 cargo test -p shmcluster-ffi --test header`.

use std::path::Path;

fn generate() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("ffi/cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

#[test]
fn header_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/shmcluster.h");
    let fresh = generate();
    if std::env::var_os("SHMC_REGEN_HEADER").is_some() {
        std::fs::write(&path, &fresh).expect("write include/shmcluster.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != fresh {
        let line = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "the end".to_string(), |i| format!("line {}", i + 1));
        panic!(
            "ffi/include/shmcluster.h is out of date with ffi/src (first difference at {line}).\n\
             Regenerate it and commit the result:\n    \
             SHMC_REGEN_HEADER=1 cargo test -p shmcluster-ffi --test header"
        );
    }
}
