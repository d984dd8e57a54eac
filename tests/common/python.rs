//! What tests with Python workers or Python tools need: the C library
//! (`libshmcluster.so`) built into this test's target directory, and a
//! python with some packages, from a virtual environment the test makes
//! under `target/` on first use (or a python the caller names).
//!
//! `common::python` (tests/common/mod.rs), or included by path
//! (`#[path = "common/python.rs"] mod python;`) by a test without `mod
//! common;`; it uses nothing else of `common`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository (this package's manifest directory).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>`: the directory above this test binary's `deps`.
pub fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("{} is not in target/<profile>/deps", exe.display()))
}

/// `target`: the directory above [`profile_dir`].
pub fn target_dir() -> Result<PathBuf, String> {
    let profile = profile_dir()?;
    profile
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "no target directory".to_owned())
}

/// Builds the C library (`libshmcluster.so`, for Python workers) into this
/// test's target directory and profile (`cargo test` of this package does
/// not build the ffi crate; a no-op when it is up to date); returns its
/// path.
pub fn build_library() -> Result<PathBuf, String> {
    let profile = profile_dir()?;
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "shmcluster-ffi",
        "--lib",
        "--target-dir",
    ])
    .arg(target_dir()?)
    .current_dir(root());
    if let Some(name) = profile
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| *n != "debug")
    {
        cmd.args(["--profile", name]);
    }
    let status = cmd.status().map_err(|e| format!("cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build -p shmcluster-ffi --lib: {status}"));
    }
    library()
}

/// The library [`build_library`] made.
pub fn library() -> Result<PathBuf, String> {
    let lib = profile_dir()?.join("libshmcluster.so");
    if !lib.exists() {
        return Err(format!("cargo build made no {}", lib.display()));
    }
    Ok(lib)
}

/// Whether `python` runs `check` (say `import uvicorn`) without error.
pub fn passes(python: &Path, check: &str) -> bool {
    Command::new(python)
        .args(["-c", check])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A python that runs `check`: the one the environment variable `var`
/// names if set (it must pass `check`), else the virtual environment
/// `target/<dir>`, made (`python3 -m venv`, then `pip install` of
/// `packages`) on first use and kept, so that later runs only check it.
/// Without `python3-venv` or PyPI: an error that says so.
pub fn venv_with(packages: &[&str], dir: &str, check: &str, var: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        if !passes(&p, check) {
            return Err(format!("{var}={} fails `{check}`", p.display()));
        }
        return Ok(p);
    }
    let venv = target_dir()?.join(dir);
    let python = venv.join("bin/python");
    // Tests of one binary run in parallel and two may want the same
    // environment at once: two `python3 -m venv` into one directory fail
    // ("File exists"), so whoever makes it holds `<dir>.lock` and the
    // others wait, then find it made. The lock is released when `_held`
    // is dropped (or its process dies).
    let lock_path = target_dir()?.join(format!("{dir}.lock"));
    let lock = std::fs::File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("lock {}: {e}", lock_path.display()))?;
    let _held = lock;
    if python.exists() && passes(&python, check) {
        return Ok(python);
    }
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .map_err(|e| format!("python3 -m venv: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "python3 -m venv {} failed (Debian: apt-get install python3-venv): {}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages)
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !(out.status.success() && passes(&python, check)) {
        return Err(format!(
            "pip install {} into {} failed (is PyPI reachable? or set {var} to a python that passes \
             `{check}`): {}",
            packages.join(" "),
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(python)
}
