//! Every committed fuzz seed (`tests/fuzz/corpus/<target>/*`) through the same property checks
//! the fuzz targets run (`tests/fuzz/src/lib.rs`, included here as a module), so the targets and
//! their seeds cannot rot between fuzzing campaigns. Fuzzing itself: tests/fuzz/README.md.

#[path = "../fuzz/src/lib.rs"]
mod fuzz_checks;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fuzz_checks::{COOKIE_KEY, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

fn run_seeds(target: &str) {
    let (_, check) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a fuzz target of that name");
    let seeds = seeds(target);
    assert!(
        seeds.len() >= 3,
        "{target}: expected committed seeds in {}",
        corpus_dir(target).display()
    );
    for (path, data) in seeds {
        // Name the seed when a check panics.
        let outcome = std::panic::catch_unwind(|| check(&data));
        if let Err(panic) = outcome {
            eprintln!("fuzz seed {} failed its checks", path.display());
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn config_parse_seeds() {
    run_seeds("config_parse");
}

#[test]
fn cookie_verify_seeds() {
    run_seeds("cookie_verify");
}

#[test]
fn authorized_keys_seeds() {
    run_seeds("authorized_keys");
}

#[test]
fn known_hosts_seeds() {
    run_seeds("known_hosts");
}

#[test]
fn forwarded_headers_seeds() {
    run_seeds("forwarded_headers");
}

/// Every target has a fuzz_targets file and a corpus, and nothing else is in corpus/.
#[test]
fn targets_match_the_fuzz_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz Cargo.toml");
    let mut dirs: Vec<String> = std::fs::read_dir(root.join("corpus"))
        .expect("corpus dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    names.sort();
    assert_eq!(dirs, names);
    for name in &names {
        assert!(
            root.join(format!("fuzz_targets/{name}.rs")).is_file(),
            "{name}"
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "{name} not a [[bin]] of tests/fuzz/Cargo.toml"
        );
    }
}

/// The `signed-*` cookie seeds hold what the seed generator (`cookie_seed`) makes, so the fuzzer
/// starts from cookies that verify; `cookie_seed` is how to make more.
#[test]
fn signed_cookie_seeds_are_valid() {
    let mut signed = 0;
    for (path, data) in seeds("cookie_verify") {
        let name = path.file_name().expect("name").to_string_lossy();
        if !name.starts_with("signed-") {
            continue;
        }
        let text = String::from_utf8(data).expect("UTF-8 seed");
        let lines: Vec<&str> = text.split('\n').collect();
        let times: Vec<u64> = lines[2]
            .split_whitespace()
            .map(|w| w.parse().expect("number"))
            .collect();
        let regenerated =
            fuzz_checks::cookie_seed(lines[0], lines[1], times[0], times[1], times[2]);
        assert!(
            text.starts_with(&regenerated),
            "{name}: cookie line is not the signed value:\n{text}\nvs\n{regenerated}"
        );
        let signer =
            gateway::http::cookie::CookieSigner::new(COOKIE_KEY, Duration::from_secs(times[2]));
        assert!(signer.verify(lines[3], times[0]).is_some(), "{name}");
        signed += 1;
    }
    assert!(signed >= 3, "expected signed-* cookie seeds");
}
