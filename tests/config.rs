//! Shipped configurations parse; invalid ones fail naming the key; the CLI's exit codes.

use std::path::Path;
use std::process::Command;

use veilgate::Config;

fn toml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            toml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
}

#[test]
fn every_shipped_config_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    toml_files(&root.join("config"), &mut files);
    assert!(!files.is_empty());
    for f in files {
        Config::load(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    let bench = root.join("../shared/tunnelbench/peers/veilgate.toml");
    if bench.exists() {
        Config::load(&bench).unwrap_or_else(|e| panic!("{}: {e}", bench.display()));
    }
}

/// Each fixture's first line is `# key: NAME`; loading it must fail with NAME in the message.
#[test]
fn invalid_fixtures_fail_naming_the_key() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut files = Vec::new();
    toml_files(&dir, &mut files);
    assert!(files.len() >= 10, "fixtures present");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let key = text.lines().next().and_then(|l| l.strip_prefix("# key: ")).expect("fixture names its key").trim();
        let err = Config::load(&f).expect_err(&format!("{} should be rejected", f.display())).to_string();
        assert!(err.contains(key), "{}: error does not name `{key}`: {err}", f.display());
    }
}

fn veilgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_veilgate")).args(args).env_remove("VEILGATE_CONFIG").output().unwrap()
}

#[test]
fn check_config_exit_codes() {
    let ok = veilgate(&["check-config"]);
    assert!(ok.status.success());
    let printed = String::from_utf8(ok.stdout).unwrap();
    assert!(printed.contains("listen = [\"127.0.0.1:8080\"]"), "{printed}");

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid/bad_duration.toml");
    let bad = veilgate(&["check-config", "--config", dir.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("header_timeout"));

    let missing = veilgate(&["check-config", "-c", "/nonexistent/veilgate.toml"]);
    assert_eq!(missing.status.code(), Some(1));

    let run_bad = veilgate(&["--config", dir.to_str().unwrap()]);
    assert_eq!(run_bad.status.code(), Some(1), "run refuses an invalid file");
}

#[test]
fn print_default_config_is_the_shipped_file() {
    let out = veilgate(&["print-default-config"]);
    assert!(out.status.success());
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/veilgate.toml")).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), shipped);
}
