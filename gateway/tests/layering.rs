//! The module rules of `gateway/src` as a test: every `crate::` reference of a module's
//! production code must name the module itself or one it may depend on (docs/architecture.md,
//! "Module rules"), and the frontends and their helpers never read `poolgate_config`. Test code
//! (`tests.rs`, anything after a `#[cfg(test)]`) may reach further.

// Test code: a failed step should abort the test at once.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

/// Each top-level module and the modules it may use. `app` (the composition root), the CLI
/// (`main`, `cli`, `simulate`) and `lib` may use everything.
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "ssh",
        &[
            "metrics",
            "health",
            "wake",
            "placement",
            "secrets",
            "html",
            "proxy_header",
        ],
    ),
    (
        "http",
        &[
            "metrics",
            "health",
            "wake",
            "secrets",
            "html",
            "proxy_header",
        ],
    ),
    (
        "admin",
        &["metrics", "health", "autoscale", "cluster", "html"],
    ),
    ("cluster", &["metrics", "placement"]),
    ("autoscale", &["metrics"]),
    ("health", &["metrics"]),
    ("demo", &["app", "autoscale", "ssh", "secrets", "html"]),
    ("metrics", &[]),
    ("wake", &[]),
    ("placement", &[]),
    ("secrets", &[]),
    ("html", &[]),
    ("proxy_header", &[]),
    ("logging", &[]),
];
const ANYTHING: &[&str] = &["app", "main", "cli", "simulate", "lib"];
/// Modules that take plain settings from the composition root and never read the
/// configuration file's types (`poolgate_config`) themselves.
const NO_CONFIG: &[&str] = &[
    "ssh",
    "http",
    "health",
    "admin",
    "cluster",
    "metrics",
    "wake",
    "placement",
    "secrets",
    "html",
    "proxy_header",
    "logging",
];

#[test]
fn every_module_uses_only_the_modules_it_may() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = BTreeSet::new();
    for file in rust_files(&src) {
        let relative = file.strip_prefix(&src).unwrap();
        let module = relative.iter().next().unwrap().to_string_lossy();
        let module = module.trim_end_matches(".rs");
        if ANYTHING.contains(&module) || file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let Some((_, allowed)) = ALLOWED.iter().find(|(m, _)| *m == module) else {
            panic!(
                "{}: module {module} has no rule in ALLOWED",
                relative.display()
            );
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let production = text.split("#[cfg(test)]").next().unwrap_or_default();
        if NO_CONFIG.contains(&module) && production.contains("poolgate_config") {
            broken.insert(format!("{} uses poolgate_config", relative.display()));
        }
        for used in crate_references(production) {
            if used != module && !allowed.contains(&used.as_str()) {
                broken.insert(format!("{} uses crate::{used}", relative.display()));
            }
        }
    }
    assert!(broken.is_empty(), "module rules broken:\n{broken:#?}");
}

/// The top-level modules named by `crate::a…` and `crate::{a…, b…}` outside `//` comments.
fn crate_references(code: &str) -> BTreeSet<String> {
    let code: String = code
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        let s = s.trim_start();
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at commas outside nested braces.
            let (mut depth, mut start) = (0usize, 0usize);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

#[test]
fn references_are_read_from_paths_and_groups_but_not_comments() {
    let code = "use crate::a::X;\nuse crate::{b::{Y, Z}, c};\nlet _ = crate::d::f(); // crate::e\n";
    let found: Vec<String> = crate_references(code).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "d"]);
}
