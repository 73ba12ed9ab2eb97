//! Architecture invariants read from the source (issue 15), as rust-analyzer's `tidy` tests do:
//! the `use crate::…` / `super::…` imports and inline `crate::` paths of every file under `src/`
//! (test modules left out) form a module graph, and
//!
//! - no import circle crosses a folder (a circle inside one folder is one unit's business; one
//!   through two folders means neither can be read, moved or tested alone);
//! - `src/model/kernels/` imports nothing from the rest of the crate and knows no candle tensor:
//!   its kernels take slices;
//! - inside `src/model/`, only `load/` (and the processor's `from_model_dir`) touches the file
//!   system: the network and the kernels take values that loading produced;
//! - seeded randomness goes through `src/rng.rs`, never `rand`'s own generators.
//!
//! The graph is read with a small lexer (comments, strings and `#[cfg(test)]` items removed), not
//! rustc: an import through a macro or a `#[path]` attribute would be missed, and the crate has
//! neither.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Circles that cross a folder and are known, each the set of files of one strongly connected
/// component (or a superset of it). Empty: the stages restructuring (issue 15 item 1) removed the
/// last one (stages importing `lower.rs`'s vocabulary while it imported them); a new entry needs a
/// reason and an issue.
const ALLOWED_CIRCLES: &[&[&str]] = &[];

/// Files under `src/model/` outside `load/` that read files: the processor reads its own files
/// from the model folder (`from_model_dir`: processor config, chat template, tokenizer).
const MODEL_FILE_READERS: &[&str] = &[
    "model/processor/chat.rs",
    "model/processor/config.rs",
    "model/processor/prompt.rs",
];

/// What file IO looks like in this crate's code.
const FILE_IO: &[&str] = &[
    "std::fs",
    "fs::",
    "File::",
    "OpenOptions",
    "read_dir",
    ".is_file()",
    ".is_dir()",
    ".exists()",
    "from_file(",
    "MmapedSafetensors",
    "serialize_to_file",
];

/// A source file as a module: its path under `src/` and its module path (`crate::model::ops`).
struct Module {
    file: PathBuf,
    path: Vec<String>,
    /// Comments, strings and `#[cfg(test)]` items removed.
    code: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn modules() -> Vec<Module> {
    let src = src_dir();
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(&src).sort_by_file_name() {
        let entry = entry.expect("walk src/");
        let file = entry.path();
        if file.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = file.strip_prefix(&src).expect("under src/").to_path_buf();
        // The binary is its own crate: it sees the library through `vlmpipe::`.
        if rel == Path::new("main.rs") {
            continue;
        }
        let mut path = vec!["crate".to_owned()];
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            match (last, part.as_str()) {
                (true, "lib.rs" | "mod.rs") => {}
                (true, name) => path.push(name.trim_end_matches(".rs").to_owned()),
                (false, dir) => path.push(dir.to_owned()),
            }
        }
        let text = std::fs::read_to_string(file).expect("read a source file");
        out.push(Module {
            file: rel,
            path,
            code: strip_tests(&strip_comments_and_strings(&text)),
        });
    }
    out
}

/// The text with comments, string and char literals blanked (so `"crate::x"` is no import).
fn strip_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').map_or(b.len(), |e| i + e);
            i = end;
        } else if rest.starts_with("/*") {
            let mut depth = 0;
            while i < b.len() {
                if text[i..].starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if text[i..].starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if let Some(hashes) = raw_string_start(rest) {
            let open = 2 + hashes + usize::from(rest.starts_with("br"));
            let close = format!("\"{}", "#".repeat(hashes));
            let end = rest[open..]
                .find(&close)
                .map_or(b.len(), |e| i + open + e + close.len());
            i = end;
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && is_char_literal(rest) {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("' '");
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `r"`, `r#"`, `br"`…: the number of `#`s.
fn raw_string_start(rest: &str) -> Option<usize> {
    let rest = rest.strip_prefix('b').unwrap_or(rest);
    let rest = rest.strip_prefix('r')?;
    let hashes = rest.len() - rest.trim_start_matches('#').len();
    rest[hashes..].starts_with('"').then_some(hashes)
}

/// A `'` that opens a char literal rather than a lifetime or label.
fn is_char_literal(rest: &str) -> bool {
    let mut chars = rest.chars().skip(1);
    matches!(
        (chars.next(), chars.next()),
        (Some('\\'), _) | (Some(_), Some('\''))
    )
}

/// The code without the items under `#[cfg(test)]` (a braced block or up to `;`).
fn strip_tests(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let brace = item.find('{');
        let semi = item.find(';');
        let end = match (brace, semi) {
            (Some(b), Some(s)) if s < b => s + 1,
            (Some(b), _) => {
                let mut depth = 0usize;
                let mut end = item.len();
                for (j, c) in item[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + j + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, Some(s)) => s + 1,
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// Every path a module's code names: each `use` tree expanded, plus inline `crate::`, `super::`
/// and `self::` paths. Paths are raw segments (`["super", "ops", "fast_exp"]`).
fn named_paths(code: &str) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let mut paths = Vec::new();
    let mut inline = Vec::new();
    let mut rest = code;
    // `use` declarations.
    let mut outside = String::new();
    while let Some(at) = find_keyword(rest, "use") {
        outside.push_str(&rest[..at]);
        let decl = &rest[at + 3..];
        let end = decl.find(';').unwrap_or(decl.len());
        expand_use_tree(&decl[..end], &[], &mut paths);
        rest = decl.get(end + 1..).unwrap_or("");
    }
    outside.push_str(rest);
    // Inline paths elsewhere in the code.
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(at) = outside[from..].find(start) {
            let at = from + at;
            from = at + start.len();
            let before = outside[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let tail = &outside[at..];
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            let segs: Vec<String> = tail[..end]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            inline.push(segs);
        }
    }
    (paths, inline)
}

/// The position of `word` as a whole word.
fn find_keyword(text: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = text[from..].find(word) {
        let at = from + at;
        let ok_before = text[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        let ok_after = text[at + word.len()..]
            .chars()
            .next()
            .is_some_and(char::is_whitespace);
        if ok_before && ok_after {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// `a::b::{c, d::{e, f as g}, self}` → `a::b::c`, `a::b::d::e`, `a::b::d::f`, `a::b`.
fn expand_use_tree(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    // Split top-level commas.
    let mut depth = 0;
    let mut start = 0;
    let mut items = Vec::new();
    for (i, c) in tree.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&tree[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&tree[start..]);
    for item in items {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (head, group) = match item.find('{') {
            Some(b) => (
                &item[..b],
                Some(&item[b + 1..item.rfind('}').unwrap_or(item.len())]),
            ),
            None => (item, None),
        };
        let head = head.split(" as ").next().unwrap_or(head);
        let segs: Vec<String> = head
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "*")
            .map(str::to_owned)
            .collect();
        let mut path = prefix.to_vec();
        for s in segs {
            if s != "self" {
                path.push(s);
            }
        }
        match group {
            Some(g) => expand_use_tree(g, &path, out),
            None => out.push(path),
        }
    }
}

fn is_under(file: &Path, folder: &str) -> bool {
    file.starts_with(folder)
}

/// The module graph: file → files it imports, through `pub use` re-exports to the defining file.
struct Graph {
    files: Vec<PathBuf>,
    code: Vec<String>,
    edges: BTreeMap<usize, BTreeSet<usize>>,
}

fn graph() -> Graph {
    let modules = modules();
    let by_path: BTreeMap<Vec<String>, usize> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| (m.path.clone(), i))
        .collect();
    // Re-exports: module → (name → absolute path), from its `use` declarations.
    let absolute = |m: &Module, segs: &[String]| -> Option<Vec<String>> {
        let first = segs.first()?;
        let mut base = m.path.clone();
        let mut rest = segs;
        match first.as_str() {
            "crate" => {
                base = vec!["crate".to_owned()];
                rest = &segs[1..];
            }
            "self" => rest = &segs[1..],
            "super" => {
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop();
                    rest = &rest[1..];
                }
            }
            // A child module named without `self::` (`pub use device::X` in a `mod.rs`).
            name => {
                let mut child = m.path.clone();
                child.push(name.to_owned());
                if !by_path.contains_key(&child) {
                    return None;
                }
            }
        }
        base.extend(rest.iter().cloned());
        Some(base)
    };
    let mut reexports: BTreeMap<usize, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut imports: Vec<Vec<Vec<String>>> = Vec::new();
    for (i, m) in modules.iter().enumerate() {
        let mut abs = Vec::new();
        let (uses, inline) = named_paths(&m.code);
        for segs in uses {
            if let Some(path) = absolute(m, &segs) {
                // The name a `use` brings into this module (as `pub use`, what others reach).
                if let Some(name) = path.last() {
                    reexports
                        .entry(i)
                        .or_default()
                        .insert(name.clone(), path.clone());
                }
                abs.push(path);
            }
        }
        abs.extend(inline.iter().filter_map(|segs| absolute(m, segs)));
        imports.push(abs);
    }
    // The file that defines what `path` names: the longest module prefix, then through that
    // module's imports when the next segment is a name it re-exports.
    let resolve = |path: &[String]| -> Option<usize> {
        let mut path = path.to_vec();
        for _ in 0..8 {
            let (len, &module) = (1..=path.len())
                .rev()
                .find_map(|n| by_path.get(&path[..n]).map(|m| (n, m)))?;
            let Some(next) = path.get(len) else {
                return Some(module);
            };
            match reexports.get(&module).and_then(|r| r.get(next)) {
                Some(target) if target.as_slice() != &path[..=len] => {
                    let mut followed = target.clone();
                    followed.extend(path[len + 1..].iter().cloned());
                    path = followed;
                }
                _ => return Some(module),
            }
        }
        None
    };
    let mut edges: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for (i, paths) in imports.iter().enumerate() {
        for p in paths {
            if let Some(j) = resolve(p)
                && j != i
            {
                edges.entry(i).or_default().insert(j);
            }
        }
    }
    Graph {
        code: modules.iter().map(|m| m.code.clone()).collect(),
        files: modules.into_iter().map(|m| m.file).collect(),
        edges,
    }
}

impl Graph {
    /// Strongly connected components with more than one file (Tarjan).
    fn circles(&self) -> Vec<Vec<usize>> {
        struct State<'a> {
            g: &'a Graph,
            index: Vec<Option<usize>>,
            low: Vec<usize>,
            on_stack: Vec<bool>,
            stack: Vec<usize>,
            next: usize,
            out: Vec<Vec<usize>>,
        }
        fn visit(s: &mut State, v: usize) {
            s.index[v] = Some(s.next);
            s.low[v] = s.next;
            s.next += 1;
            s.stack.push(v);
            s.on_stack[v] = true;
            let succ: Vec<usize> = s.g.edges.get(&v).into_iter().flatten().copied().collect();
            for w in succ {
                match s.index[w] {
                    None => {
                        visit(s, w);
                        s.low[v] = s.low[v].min(s.low[w]);
                    }
                    Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(s.low[v]) == s.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = s.stack.pop() {
                    s.on_stack[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort_unstable();
                    s.out.push(comp);
                }
            }
        }
        let n = self.files.len();
        let mut s = State {
            g: self,
            index: vec![None; n],
            low: vec![0; n],
            on_stack: vec![false; n],
            stack: Vec::new(),
            next: 0,
            out: Vec::new(),
        };
        for v in 0..n {
            if s.index[v].is_none() {
                visit(&mut s, v);
            }
        }
        s.out.sort();
        s.out
    }

    /// One concrete cycle through `comp`'s first file (shortest, by breadth-first search).
    fn cycle(&self, comp: &[usize]) -> Vec<usize> {
        let inside: BTreeSet<usize> = comp.iter().copied().collect();
        let start = comp[0];
        let mut parent: BTreeMap<usize, usize> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        while let Some(v) = queue.pop_front() {
            for &w in self.edges.get(&v).into_iter().flatten() {
                if !inside.contains(&w) {
                    continue;
                }
                if w == start {
                    let mut path = vec![v];
                    let mut at = v;
                    while at != start {
                        at = parent[&at];
                        path.push(at);
                    }
                    path.reverse();
                    return path;
                }
                if let std::collections::btree_map::Entry::Vacant(e) = parent.entry(w) {
                    e.insert(v);
                    queue.push_back(w);
                }
            }
        }
        comp.to_vec()
    }

    fn show(&self, files: &[usize]) -> String {
        let mut names: Vec<String> = files
            .iter()
            .map(|&i| self.files[i].display().to_string())
            .collect();
        if let Some(first) = names.first().cloned() {
            names.push(first);
        }
        names.join(" → ")
    }

    fn folder(&self, i: usize) -> &Path {
        self.files[i].parent().unwrap_or(Path::new(""))
    }
}

#[test]
fn no_import_circle_crosses_a_folder() {
    let g = graph();
    let circles = g.circles();
    for comp in &circles {
        let files: Vec<String> = comp
            .iter()
            .map(|&i| g.files[i].display().to_string())
            .collect();
        eprintln!(
            "circle ({} files: {}): {}",
            comp.len(),
            files.join(", "),
            g.show(&g.cycle(comp))
        );
    }
    let allowed: Vec<BTreeSet<PathBuf>> = ALLOWED_CIRCLES
        .iter()
        .map(|files| files.iter().map(PathBuf::from).collect())
        .collect();
    let mut bad = Vec::new();
    for comp in &circles {
        let folders: BTreeSet<&Path> = comp.iter().map(|&i| g.folder(i)).collect();
        if folders.len() < 2 {
            continue;
        }
        let files: BTreeSet<PathBuf> = comp.iter().map(|&i| g.files[i].clone()).collect();
        if allowed.iter().any(|a| files.is_subset(a)) {
            continue;
        }
        bad.push(format!(
            "{} (folders: {})",
            g.show(&g.cycle(comp)),
            folders
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    assert!(
        bad.is_empty(),
        "import circles that cross a folder (break them by moving the shared item down):\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_import_circle_inside_the_model() {
    let g = graph();
    let circles: Vec<String> = g
        .circles()
        .iter()
        .filter(|comp| comp.iter().any(|&i| is_under(&g.files[i], "model")))
        .map(|comp| g.show(&g.cycle(comp)))
        .collect();
    assert!(
        circles.is_empty(),
        "import circles in src/model:\n{}",
        circles.join("\n")
    );
}

#[test]
fn kernels_know_only_slices() {
    let g = graph();
    let mut bad = Vec::new();
    for (i, file) in g.files.iter().enumerate() {
        if !is_under(file, "model/kernels") {
            continue;
        }
        for &j in g.edges.get(&i).into_iter().flatten() {
            if !is_under(&g.files[j], "model/kernels") {
                bad.push(format!(
                    "{} imports {}",
                    file.display(),
                    g.files[j].display()
                ));
            }
        }
        for word in ["candle_core", "candle_nn", "Tensor"] {
            if g.code[i].contains(word) {
                bad.push(format!("{} names `{word}`", file.display()));
            }
        }
    }
    assert!(
        !g.files.iter().all(|f| !is_under(f, "model/kernels")),
        "no src/model/kernels/"
    );
    assert!(
        bad.is_empty(),
        "kernels must take slices only:\n{}",
        bad.join("\n")
    );
}

#[test]
fn only_loading_touches_files_in_the_model() {
    let g = graph();
    let mut bad = Vec::new();
    for (i, file) in g.files.iter().enumerate() {
        let allowed =
            is_under(file, "model/load") || MODEL_FILE_READERS.iter().any(|r| file == Path::new(r));
        if !is_under(file, "model") || allowed {
            continue;
        }
        for pattern in FILE_IO {
            if g.code[i].contains(pattern) {
                bad.push(format!("{} uses `{pattern}`", file.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "file IO under src/model belongs in src/model/load/:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_network_does_not_import_its_loading() {
    // Loading builds the network from files; the network never reaches back for files.
    let g = graph();
    let mut bad = Vec::new();
    for (i, file) in g.files.iter().enumerate() {
        if !is_under(file, "model")
            || is_under(file, "model/load")
            || file == Path::new("model/mod.rs")
        {
            continue;
        }
        for &j in g.edges.get(&i).into_iter().flatten() {
            if is_under(&g.files[j], "model/load") {
                bad.push(format!(
                    "{} imports {}",
                    file.display(),
                    g.files[j].display()
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn seeded_randomness_goes_through_the_rng_module() {
    // `rand`'s generators and distributions promise no stream across versions; everything seeded
    // that must reproduce draws from `crate::rng::SeededRng` (PCG-64, pinned by its tests).
    let g = graph();
    let mut bad = Vec::new();
    for (i, file) in g.files.iter().enumerate() {
        if file == Path::new("rng.rs") {
            continue;
        }
        for pattern in [
            "rand::",
            "StdRng",
            "SmallRng",
            "thread_rng",
            "rand_pcg",
            "RngExt",
            // SplitMix64's increment: a hand-written copy of the generator.
            "0x9E37_79B9_7F4A_7C15",
            "0x9e3779b97f4a7c15",
        ] {
            if g.code[i].contains(pattern) {
                bad.push(format!("{} uses `{pattern}`", file.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "seeded randomness belongs in src/rng.rs:\n{}",
        bad.join("\n")
    );
}

/// Every `pub mod` under `src/`, as a path from the crate root (`model::load::checkpoint`).
fn public_modules() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for module in modules() {
        for line in module.code.lines() {
            if let Some(name) = line.trim().strip_prefix("pub mod ") {
                let mut path = module.path[1..].to_vec();
                path.push(name.trim_end_matches(';').trim().to_owned());
                out.insert(path.join("::"));
            }
        }
    }
    out
}

/// The public modules are the ones ARCHITECTURE.md's "Public surface" lists (issue 15 item 5):
/// making a module public is a decision about the library, written down where readers look.
#[test]
fn public_modules_are_the_documented_ones() {
    let doc = std::fs::read_to_string(src_dir().join("../ARCHITECTURE.md")).expect("read doc");
    let section = doc
        .split("## Public surface")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("ARCHITECTURE.md has a `## Public surface` section");
    // The list is the section's one line made of backticked module paths only.
    let list = section
        .lines()
        .find(|line| line.starts_with("`cache`"))
        .expect("the list of public modules, a line starting with `cache`");
    let listed: BTreeSet<String> = list
        .trim_end_matches('.')
        .split_whitespace()
        .map(|word| word.trim_matches('`').to_owned())
        .collect();
    let actual = public_modules();
    assert_eq!(
        actual, listed,
        "public modules (left) differ from ARCHITECTURE.md's list (right): document the change \
         there, or make the module `pub(crate)`"
    );
}
