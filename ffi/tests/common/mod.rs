//! Building C programs against the library for the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds this crate's cdylib into the test's own target directory and
/// profile, once per test process: `cargo test` builds a cdylib-only
/// crate's test harness, not the `.so` itself (a no-op when up to date).
fn build_library(profile_dir: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let target_dir = profile_dir.parent().expect("target dir");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "shmcluster-ffi",
            "--lib",
            "--target-dir",
        ])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if let Some(name) = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| *n != "debug")
        {
            cmd.args(["--profile", name]);
        }
        let status = cmd.status().expect("run cargo build for libshmcluster.so");
        assert!(status.success(), "cargo build -p shmcluster-ffi --lib failed");
    });
}

/// The directory holding `libshmcluster.so`: next to this test binary
/// (`target/<profile>/deps`) or one up.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    build_library(deps.parent().expect("profile dir"));
    for dir in [deps.clone(), deps.parent().expect("profile dir").to_path_buf()] {
        if dir.join("libshmcluster.so").exists() {
            return dir;
        }
    }
    panic!("libshmcluster.so not found next to {}", exe.display());
}

/// Compiles `source` into an executable in the test's scratch directory.
pub fn compile(source: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(source.file_stem().expect("a file name"));
    let status = Command::new("cc")
        .args(["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-g"])
        .arg("-I")
        .arg(manifest.join("include"))
        .arg("-I")
        .arg(manifest.join("tests/c"))
        .arg(source)
        .arg("-o")
        .arg(&out)
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lshmcluster", "-lpthread"])
        .status()
        .expect("run cc (a C compiler is needed for the C tests)");
    assert!(status.success(), "cc failed on {}", source.display());
    out
}
