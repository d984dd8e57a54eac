//! Building C programs against the library for the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding `libshmcluster.so`: next to this test binary
/// (`target/<profile>/deps`) or one up.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir").to_path_buf();
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
