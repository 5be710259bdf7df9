//! The deploy's cloud-init files read as text (no YAML parser): the `write_files` entries the
//! deploy tests check and the batch tests run against real Slurm.

/// The text of the `write_files` entry for `path` in a cloud-init file's source, up to the next
/// entry.
pub fn written_file<'a>(cloud_init: &'a str, path: &str) -> &'a str {
    let (_, rest) = cloud_init
        .split_once(&format!("  - path: {path}\n"))
        .unwrap_or_else(|| panic!("cloud-init installs no {path}"));
    rest.find("\n  - path: ").map_or(rest, |end| &rest[..end])
}

/// The content cloud-init writes to `path` (the entry's `content: |` block, unindented).
pub fn written_content(cloud_init: &str, path: &str) -> String {
    let entry = written_file(cloud_init, path);
    let (_, block) = entry
        .split_once("    content: |\n")
        .unwrap_or_else(|| panic!("the entry for {path} has no content block"));
    let mut out = String::new();
    for line in block.lines() {
        match line.strip_prefix("      ") {
            Some(text) => out.push_str(text),
            None if line.is_empty() => {}
            None => break,
        }
        out.push('\n');
    }
    out
}
