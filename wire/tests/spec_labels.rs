//! docs/spec.md's normative statements against the tests that prove them.
//!
//! Every sentence of the device chapter with MUST or SHOULD (NOT) carries a label `[S-N]`
//! (S: the section after "5.x.", N: a number), unique, in its own section; every label is
//! named by at least one test (`spec: [S-N]` in a comment of a `.rs` file of this repository);
//! every label a test names exists. Run with `--nocapture` to see which tests prove what.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// A label's text (`6.2-1`) and its section (`6.2`), parsed from `[6.2-1]` at `text[at..]`.
fn label_at(text: &str, at: usize) -> Option<(String, String, usize)> {
    let rest = text.get(at..)?.strip_prefix('[')?;
    let end = rest.find(']')?;
    let inner = &rest[..end];
    let (section, number) = inner.split_once('-')?;
    let section_ok = !section.is_empty()
        && section
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
    let number_ok = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
    (section_ok && number_ok).then(|| (inner.to_string(), section.to_string(), end + 2))
}

/// All labels in `text`, with their byte offsets.
fn labels_in(text: &str) -> Vec<(usize, String, String)> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices('[') {
        if let Some((label, section, _)) = label_at(text, at) {
            found.push((at, label, section));
        }
    }
    found
}

/// Byte offsets where a sentence starts (after ". ", "! ", "? "; abbreviations aside).
fn sentence_start_before(text: &str, at: usize) -> usize {
    let bytes = text.as_bytes();
    let mut start = 0;
    for i in 0..at {
        let ends = matches!(bytes[i], b'.' | b'!' | b'?')
            && bytes.get(i + 1).is_some_and(|b| b.is_ascii_whitespace());
        if !ends {
            continue;
        }
        let word_start = text[..i]
            .rfind(|c: char| c.is_whitespace() || c == '(')
            .map_or(0, |w| w + 1);
        let word = &text[word_start..i];
        if matches!(word, "e.g" | "i.e" | "etc" | "vs") {
            continue;
        }
        start = i + 1;
    }
    start
}

/// Offsets of MUST / SHOULD used as keywords (whole words, upper case).
fn keywords_in(text: &str) -> Vec<usize> {
    let mut found = Vec::new();
    for keyword in ["MUST", "SHOULD"] {
        for (at, _) in text.match_indices(keyword) {
            let before = text[..at].chars().next_back();
            let after = text[at + keyword.len()..].chars().next();
            let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_alphanumeric() && c != '_');
            if boundary(before) && boundary(after) {
                found.push(at);
            }
        }
    }
    found.sort_unstable();
    found
}

struct Spec {
    /// label → (section heading, statement's opening words).
    labels: BTreeMap<String, String>,
    problems: Vec<String>,
}

fn read_spec() -> Spec {
    let text = std::fs::read_to_string(repo().join("docs/spec.md")).expect("docs/spec.md");
    let body = &text[text.find("\n## 5.x ").expect("the device chapter")..];
    let mut labels = BTreeMap::new();
    let mut problems = Vec::new();
    let mut section: Option<String> = None;
    let mut in_code = false;
    // Statements are the items of a block: a bullet, a numbered step, a table row, or a
    // paragraph; an item continues over the lines that follow it.
    let mut items: Vec<(Option<String>, String)> = Vec::new();
    for line in body.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            items.push((section.clone(), String::new()));
            continue;
        }
        if in_code {
            continue;
        }
        if let Some(heading) = line.strip_prefix('#') {
            let heading = heading.trim_start_matches('#').trim();
            section = heading.strip_prefix("5.x.").map(|rest| {
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            });
            items.push((section.clone(), String::new()));
            continue;
        }
        let trimmed = line.trim_start();
        let starts_item = trimmed.is_empty()
            || trimmed.starts_with("* ")
            || trimmed.starts_with('|')
            || trimmed
                .split_once(". ")
                .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if starts_item || items.is_empty() {
            items.push((section.clone(), String::new()));
        }
        let current = &mut items.last_mut().expect("an item").1;
        current.push(' ');
        current.push_str(trimmed);
    }
    for (section, item) in &items {
        let found = labels_in(item);
        for (_, label, label_section) in &found {
            match section {
                Some(s) if s == label_section => {}
                _ => problems.push(format!(
                    "[{label}] sits in section {section:?}, not in 5.x.{label_section}"
                )),
            }
            let opening: String = item
                .split_whitespace()
                .take(12)
                .collect::<Vec<_>>()
                .join(" ");
            if labels.insert(label.clone(), opening).is_some() {
                problems.push(format!("[{label}] is used twice"));
            }
        }
        for keyword in keywords_in(item) {
            let start = sentence_start_before(item, keyword);
            if !found.iter().any(|(at, _, _)| *at >= start && *at < keyword) {
                let sentence: String = item[start..]
                    .split_whitespace()
                    .take(14)
                    .collect::<Vec<_>>()
                    .join(" ");
                problems.push(format!("unlabelled normative sentence: \"{sentence} …\""));
            }
        }
    }
    Spec { labels, problems }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !matches!(
                name.as_ref(),
                "target" | "build" | "third_party" | ".git" | "node_modules"
            ) {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// label → tests naming it (file::fn).
fn references() -> BTreeMap<String, BTreeSet<String>> {
    let root = repo();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        if file.ends_with("wire/tests/spec_labels.rs") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let relative = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        let lines: Vec<&str> = text.lines().collect();
        for (index, line) in lines.iter().enumerate() {
            let Some(at) = line.find("spec: [") else {
                continue;
            };
            if !line.trim_start().starts_with("//") {
                continue;
            }
            let test = lines[index..]
                .iter()
                .find_map(|l| {
                    let l = l.trim_start();
                    let rest = l
                        .strip_prefix("fn ")
                        .or_else(|| l.strip_prefix("pub fn "))
                        .or_else(|| l.strip_prefix("async fn "))?;
                    Some(rest.split('(').next().unwrap_or(rest).to_string())
                })
                .unwrap_or_else(|| format!("line {}", index + 1));
            let tail = &line[at + "spec: ".len()..];
            for (_, label, _) in labels_in(tail) {
                refs.entry(label)
                    .or_default()
                    .insert(format!("{relative}::{test}"));
            }
        }
    }
    refs
}

#[test]
fn every_normative_statement_is_labelled_and_every_label_is_tested() {
    let spec = read_spec();
    let refs = references();
    let mut problems = spec.problems;
    for label in spec.labels.keys() {
        if !refs.contains_key(label) {
            problems.push(format!("[{label}] has no test naming it"));
        }
    }
    for (label, tests) in &refs {
        if !spec.labels.contains_key(label) {
            problems.push(format!(
                "{tests:?} name [{label}], which the spec does not have"
            ));
        }
    }
    println!("{} labelled statements:", spec.labels.len());
    for (label, opening) in &spec.labels {
        println!("[{label}] {opening}");
        for test in refs.get(label).into_iter().flatten() {
            println!("    {test}");
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_checker_finds_unlabelled_sentences_and_labels() {
    let item = "[6.2-1] The device MUST do this. It SHOULD also, e.g. that.";
    let keywords = keywords_in(item);
    assert_eq!(keywords.len(), 2);
    let labels = labels_in(item);
    assert_eq!(labels.len(), 1);
    assert_eq!(labels[0].1, "6.2-1");
    assert_eq!(sentence_start_before(item, keywords[0]), 0);
    assert!(
        sentence_start_before(item, keywords[1]) > labels[0].0,
        "a new sentence"
    );
    assert!(keywords_in("MUSTARD and SHOULDER").is_empty());
    assert_eq!(label_at("[a-1]", 0), None);
}
