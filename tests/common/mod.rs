//! Helpers shared by the integration tests: run the real `cip` binary in a temp project.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn cip_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cip"))
}

pub fn cip(dir: &Path, args: &[&str]) -> Output {
    Command::new(cip_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("CIP_CACHE")
        .env("NO_COLOR", "1")
        .output()
        .expect("cip runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `ran N · cached M · failed F` line of a run.
pub fn summary(o: &Output) -> (usize, usize, usize) {
    let out = stdout(o);
    let line = out
        .lines()
        .find(|l| l.starts_with("ran "))
        .unwrap_or_else(|| panic!("no summary line in stdout:\n{out}\nstderr:\n{}", stderr(o)));
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (nums[0], nums[1], nums[2])
}

/// Every file under `dir` with its bytes, sorted by path: to check nothing changed.
pub fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                    out.push((rel, std::fs::read(&p).unwrap_or_default()));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Complete entries of a kind in a cache.
pub fn entries(cache: &Path, kind: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cache.join(kind))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && p.join("meta.json").exists())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Starts `cip run exp.toml -q` in `dir`, waits until `journaled()` reports at least `at_least`
/// items, then kills the process with SIGKILL: the crash the resume tests recover from.
pub fn run_and_kill_9(dir: &Path, at_least: usize, journaled: impl Fn() -> usize) {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = Command::new(cip_bin())
        .args(["run", "exp.toml", "-q"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while journaled() < at_least {
        assert!(Instant::now() < deadline, "journal never grew");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}
