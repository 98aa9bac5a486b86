//! The Python SDK (`sdk/python`): its pytest suite, which starts a real
//! `airlock daemon` from the binary cargo built (Unix socket and TLS
//! listener) and drives sandboxes through the SDK, and `mypy --strict` over
//! the package and its tests. Both run from a venv scripts/test.sh makes,
//! `target/test-deps/py-sdk`, with the SDK installed editable.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::support::*;

/// The venv scripts/test.sh installs pytest, mypy and the SDK into.
fn venv() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("test-deps/py-sdk")
}

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/python")
}

/// The venv's python when it can import `module` and the SDK.
fn python_with(module: &str) -> Option<PathBuf> {
    let python = venv().join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}, airlock")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(python)
}

fn python(python: &Path) -> Command {
    let mut cmd = Command::new(python);
    // Nothing written into the source tree: no bytecode, no pytest cache.
    cmd.current_dir(sdk_dir()).env("PYTHONDONTWRITEBYTECODE", "1").stdin(Stdio::null());
    cmd
}

#[test]
fn the_python_sdk_passes_its_tests_against_a_real_daemon() {
    if !require(is_root(), "root (the SDK's tests create sandboxes through a daemon of their own)") {
        return;
    }
    let py = python_with("pytest");
    let what = format!("pytest and the SDK in {} (scripts/test.sh installs them)", venv().display());
    if !require(py.is_some(), &what) {
        return;
    }
    let py = py.unwrap();
    let out = python(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .env("AIRLOCK_BIN", BIN)
        .env("AIRLOCK_TEST_ROOT", test_root())
        .output()
        .unwrap();
    assert!(out.status.success(), "pytest failed:\n{}", show(&out));
    // The run must have run tests, not collected nothing.
    assert!(stdout(&out).contains(" passed"), "{}", show(&out));
    assert!(!stdout(&out).contains("skipped"), "no SDK test may be skipped:\n{}", show(&out));
}

#[test]
fn the_python_sdk_type_checks_strictly() {
    let py = python_with("mypy");
    let what = format!("mypy and the SDK in {} (scripts/test.sh installs them)", venv().display());
    if !require(py.is_some(), &what) {
        return;
    }
    let py = py.unwrap();
    let cache = venv().join("mypy-cache");
    // pyproject.toml holds the settings: strict, over the package and its tests.
    let out = python(&py).args(["-m", "mypy", "--strict", "--cache-dir"]).arg(&cache).output().unwrap();
    assert!(out.status.success(), "mypy --strict failed:\n{}", show(&out));
}
