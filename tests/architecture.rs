//! The shape of the source tree (docs/architecture.md): the top-level modules are layers, each
//! using only the layers below it, so the module graph has no cycle; no function is longer than
//! a screen (100 lines) and no file longer than 700 lines.
//!
//! Read from the source text: `crate::<module>` paths outside comments and test modules are the
//! edges. (`cargo modules dependencies --acyclic` shows the same graph, with a tool to install.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top first; docs/architecture.md draws the same list.
const LAYERS: &[&str] = &[
    "app",
    "admin",
    "keda",
    "listen",
    "forward",
    "route",
    "prewarm",
    "activate",
    "gate",
    "cluster",
    "upstream",
    "telemetry",
    "error",
    "config",
    "fields",
    "shutdown",
    "demo",
];

const MAX_FUNCTION_LINES: usize = 100;
const MAX_FILE_LINES: usize = 700;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`None` for lib.rs and main.rs).
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// Whether a file is test code (a `tests.rs` or a file under a `tests/` folder).
fn is_test_file(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "tests")
        || path.file_name().is_some_and(|n| n == "tests.rs")
}

/// The code of a file without its test module and its comments.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let path = regex::Regex::new(r"crate::(\w+)").unwrap();
    let group = regex::Regex::new(r"crate::\{([^}]*)\}").unwrap();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files.iter().filter(|f| !is_test_file(f)) {
        let Some(from) = module_of(file) else {
            continue;
        };
        let code = code(&std::fs::read_to_string(file).unwrap());
        let mut to: Vec<String> = path
            .captures_iter(&code)
            .map(|c| c[1].to_string())
            .collect();
        for g in group.captures_iter(&code) {
            to.extend(g[1].split(',').filter_map(|p| {
                let name = p.trim().split("::").next()?.trim();
                (!name.is_empty()).then(|| name.to_string())
            }));
        }
        let entry = edges.entry(from.clone()).or_default();
        for t in to {
            if t != from && LAYERS.contains(&t.as_str()) {
                entry.insert(t);
            }
        }
    }
    edges
}

#[test]
fn every_top_level_module_is_a_layer() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    let missing: Vec<&String> = modules
        .iter()
        .filter(|m| !LAYERS.contains(&m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "modules missing from LAYERS (and docs/architecture.md): {missing:?}"
    );
}

#[test]
fn a_layer_uses_only_the_layers_below_it() {
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m).unwrap();
    let mut upward = Vec::new();
    for (from, tos) in edges() {
        for to in tos {
            if rank(&to) <= rank(&from) {
                upward.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports of a layer at or above the importer's: {upward:#?}"
    );
}

/// Function lengths by the indentation of their closing brace (rustfmt's layout).
fn long_functions(path: &Path, text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = regex::Regex::new(r"^(\s*)(pub(\([a-z]+\))? )?(const )?(async )?fn (\w+)").unwrap();
    let mut long = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "#[cfg(test)]" && lines.get(i + 1).is_some_and(|l| l.contains("mod "))
        {
            break;
        }
        let Some(c) = start.captures(lines[i]) else {
            i += 1;
            continue;
        };
        let indent = c[1].len();
        let name = c[6].to_string();
        let mut j = i;
        while j < lines.len() && !lines[j].trim_end().ends_with('{') && !lines[j].ends_with(';') {
            j += 1;
        }
        if j >= lines.len() || lines[j].ends_with(';') {
            i = j + 1;
            continue;
        }
        let close = format!("{}}}", " ".repeat(indent));
        let mut k = j + 1;
        while k < lines.len() && !lines[k].starts_with(&close) {
            k += 1;
        }
        let len = k - i + 1;
        if len > MAX_FUNCTION_LINES {
            long.push(format!("{}:{} {name}: {len} lines", path.display(), i + 1));
        }
        i = k + 1;
    }
    long
}

#[test]
fn functions_read_in_one_screen_and_files_stay_small() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let n = text.lines().count();
        if n > MAX_FILE_LINES {
            problems.push(format!("{}: {n} lines", file.display()));
        }
        if !is_test_file(file) {
            problems.extend(long_functions(file, &text));
        }
    }
    assert!(problems.is_empty(), "too long: {problems:#?}");
}

#[test]
fn the_scanner_sees_an_upward_import_and_a_long_function() {
    // The checks above can fail: a made-up file with both faults is caught.
    let text = format!(
        "use crate::app::Running;\nfn long() {{\n{}}}\n",
        "    let _x = 1;\n".repeat(MAX_FUNCTION_LINES)
    );
    assert_eq!(long_functions(Path::new("made_up.rs"), &text).len(), 1);
    let re = regex::Regex::new(r"crate::(\w+)").unwrap();
    assert_eq!(&re.captures(&code(&text)).unwrap()[1], "app");
}
