//! What the ffi tests share: the workspace's paths, `cargo build` into the
//! test's own target directory, building C programs against the library,
//! and (in [`cluster`]) running a `shmcluster run` master.

// Each test binary uses part of this.
#![allow(dead_code)]

pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
}

/// `target/<profile>`: the directory above this test binary's `deps`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// `cargo build --quiet <args>` into this test's target directory and
/// profile, from the workspace root (a no-op when up to date); the caller
/// runs it.
pub fn cargo_build(args: &[&str]) -> Command {
    let profile = profile_dir();
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "--quiet"])
        .args(args)
        .arg("--target-dir")
        .arg(profile.parent().expect("target dir"))
        .current_dir(repo_root());
    if let Some(name) = profile
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| *n != "debug")
    {
        cmd.args(["--profile", name]);
    }
    cmd
}

/// [`cargo_build`] of the `shmcluster` binary ([`cli`]) and this crate's
/// cdylib ([`library`]): what a test that starts `shmcluster run` needs
/// (`cargo test -p shmcluster-ffi` alone builds neither).
pub fn cargo_build_cli_and_library() -> Command {
    cargo_build(&[
        "-p",
        "shmcluster",
        "--bin",
        "shmcluster",
        "-p",
        "shmcluster-ffi",
        "--lib",
    ])
}

/// The `shmcluster` binary [`cargo_build_cli_and_library`] makes.
pub fn cli() -> PathBuf {
    profile_dir().join("shmcluster")
}

/// The cdylib cargo built for these tests: `libshmcluster.so` next to this
/// test binary (`target/<profile>/deps`) or one up.
pub fn library() -> PathBuf {
    let profile = profile_dir();
    [profile.join("deps"), profile.clone()]
        .into_iter()
        .map(|d| d.join("libshmcluster.so"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("libshmcluster.so not found in {}", profile.display()))
}

/// Builds this crate's cdylib, once per test process: `cargo test` builds
/// a cdylib-only crate's test harness, not the `.so` itself.
fn build_library() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let status = cargo_build(&["-p", "shmcluster-ffi", "--lib"])
            .status()
            .expect("run cargo build for libshmcluster.so");
        assert!(status.success(), "cargo build -p shmcluster-ffi --lib failed");
    });
}

/// The directory holding `libshmcluster.so`, built first.
fn lib_dir() -> PathBuf {
    build_library();
    library().parent().expect("the library's directory").to_path_buf()
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
