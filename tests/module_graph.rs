//! The crate's module graph has no cycle between two modules: no module
//! imports one that imports it back, and no module imports items from a
//! module that contains it (its parent's `mod.rs`, or any ancestor's), since
//! the ancestor already depends on it by declaring it.
//!
//! The check reads `src/` itself: it strips comments, string literals and
//! `#[cfg(test)]` items (test modules test their parent; they are not part of
//! the program's graph), then resolves every `use` tree and every
//! `crate::`/`super::`/`self::` path to the deepest module it names.
//!
//! `cargo test --test module_graph -- --nocapture` prints the edges found.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".to_string()
    } else {
        format!("crate::{}", m.join("::"))
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Path, // `::`
    Punct(char),
}

/// Comments, string and char literals removed; `$crate` kept as `crate`.
fn strip(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
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
        } else if (c == 'r' || c == 'b')
            && !prev_is_ident(&b, i)
            && raw_string_start(&b, i).is_some()
        {
            let (hashes, body) = raw_string_start(&b, i).unwrap();
            i = body;
            loop {
                if i >= b.len() {
                    break;
                }
                if b[i] == '"' && (0..hashes).all(|k| b.get(i + 1 + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < b.len() && b[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            } else if b.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// At `r"`, `r#"`, `br"`…: the number of `#` and where the body starts.
fn raw_string_start(b: &[char], i: usize) -> Option<(usize, usize)> {
    let mut j = i;
    if b[j] == 'b' {
        j += 1;
    }
    if b.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let mut hashes = 0;
    while b.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    (b.get(j) == Some(&'"')).then_some((hashes, j + 1))
}

fn tokenize(src: &str) -> Vec<Tok> {
    let b: Vec<char> = strip(src).chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            toks.push(Tok::Ident(b[start..i].iter().collect()));
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
        } else if c == ':' && b.get(i + 1) == Some(&':') {
            toks.push(Tok::Path);
            i += 2;
        } else if c == '$' {
            i += 1; // `$crate` reads as `crate`
        } else if c.is_whitespace() {
            i += 1;
        } else {
            toks.push(Tok::Punct(c));
            i += 1;
        }
    }
    toks
}

fn ident(t: Option<&Tok>) -> Option<&str> {
    match t {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

/// The index just past the item that starts at `i` (after its attributes):
/// the next `;` at depth 0, or the end of its first `{ … }` at depth 0
/// unless it is a `use` item.
fn skip_item(toks: &[Tok], mut i: usize) -> usize {
    let is_use = toks[i..]
        .iter()
        .take_while(|t| !matches!(t, Tok::Punct(';') | Tok::Punct('{')))
        .any(|t| *t == Tok::Ident("use".into()));
    let mut depth = 0i32;
    while i < toks.len() {
        match &toks[i] {
            Tok::Punct('{') | Tok::Punct('(') | Tok::Punct('[') => depth += 1,
            Tok::Punct('}') | Tok::Punct(')') | Tok::Punct(']') => {
                depth -= 1;
                if depth == 0 && !is_use && toks[i] == Tok::Punct('}') {
                    return i + 1;
                }
            }
            Tok::Punct(';') if depth == 0 => return i + 1,
            _ => {}
        }
        i += 1;
    }
    i
}

/// At `#`: the index past the attribute, and whether it is `#[cfg(test)]`.
fn attribute(toks: &[Tok], i: usize) -> Option<(usize, bool)> {
    if toks.get(i) != Some(&Tok::Punct('#')) {
        return None;
    }
    let mut j = i + 1;
    if toks.get(j) == Some(&Tok::Punct('!')) {
        j += 1;
    }
    if toks.get(j) != Some(&Tok::Punct('[')) {
        return None;
    }
    let start = j;
    let mut depth = 0;
    while j < toks.len() {
        match toks[j] {
            Tok::Punct('[') => depth += 1,
            Tok::Punct(']') => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            _ => {}
        }
        j += 1;
    }
    let inner = &toks[start + 1..j];
    let cfg_test = inner
        == [
            Tok::Ident("cfg".into()),
            Tok::Punct('('),
            Tok::Ident("test".into()),
            Tok::Punct(')'),
        ];
    Some((j + 1, cfg_test))
}

/// The tokens with every `#[cfg(test)]` item removed, and the names of the
/// file modules declared under `#[cfg(test)]`.
fn without_tests(toks: &[Tok]) -> (Vec<Tok>, BTreeSet<String>) {
    let mut out = Vec::new();
    let mut test_mods = BTreeSet::new();
    let mut i = 0;
    while i < toks.len() {
        if let Some((after, cfg_test)) = attribute(toks, i) {
            if !cfg_test {
                out.extend_from_slice(&toks[i..after]);
                i = after;
                continue;
            }
            let mut j = after;
            while let Some((a, _)) = attribute(toks, j) {
                j = a;
            }
            let end = skip_item(toks, j);
            let item = &toks[j..end];
            if let Some(p) = item.iter().position(|t| *t == Tok::Ident("mod".into()))
                && let Some(m) = ident(item.get(p + 1))
                && item.get(p + 2) == Some(&Tok::Punct(';'))
            {
                test_mods.insert(m.to_string());
            }
            i = end;
        } else {
            out.push(toks[i].clone());
            i += 1;
        }
    }
    (out, test_mods)
}

/// The full paths of a `use` tree starting at `i` (after `use`), and the
/// index past its `;`.
fn use_tree(toks: &[Tok], i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    let mut i = i;
    if toks.get(i) == Some(&Tok::Path) {
        i += 1; // `use ::std::…`
    }
    loop {
        match toks.get(i) {
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                i += 1;
                if toks.get(i) == Some(&Tok::Path) {
                    i += 1;
                    continue;
                }
                if ident(toks.get(i)) == Some("as") {
                    i += 2;
                }
                out.push(path);
                return i;
            }
            Some(Tok::Punct('*')) => {
                out.push(path);
                return i + 1;
            }
            Some(Tok::Punct('{')) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        Some(Tok::Punct('}')) => return i + 1,
                        Some(Tok::Punct(',')) => i += 1,
                        None => return i,
                        _ => i = use_tree(toks, i, &path, out),
                    }
                }
            }
            _ => {
                out.push(path);
                return i;
            }
        }
    }
}

struct Graph {
    /// Every module of the program, with the file it lives in.
    modules: BTreeMap<Module, PathBuf>,
    /// module → module it imports → one path that shows it.
    edges: BTreeMap<Module, BTreeMap<Module, String>>,
}

fn module_of(src: &Path, file: &Path) -> Option<Module> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    match stem {
        "lib" if parts.is_empty() => {}
        "main" if parts.is_empty() => return None, // the binary: its own crate
        "mod" => {}
        s => parts.push(s.to_string()),
    }
    Some(parts)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);

    // First pass: the modules, without those declared under #[cfg(test)].
    let mut parsed = BTreeMap::new();
    let mut test_only = BTreeSet::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        let text = fs::read_to_string(f).unwrap();
        let (toks, test_mods) = without_tests(&tokenize(&text));
        for t in test_mods {
            let mut child = m.clone();
            child.push(t);
            test_only.insert(child);
        }
        parsed.insert(m, (f.clone(), toks));
    }
    parsed.retain(|m, _| !test_only.iter().any(|t| m.starts_with(t)));
    // `#[macro_export]` macros are named at the crate root (`crate::outln`)
    // but belong to the module that defines them.
    let mut macros: BTreeMap<String, Module> = BTreeMap::new();
    for (m, (_, toks)) in &parsed {
        for w in toks.windows(9) {
            if w[..6]
                == [
                    Tok::Punct('#'),
                    Tok::Punct('['),
                    Tok::Ident("macro_export".into()),
                    Tok::Punct(']'),
                    Tok::Ident("macro_rules".into()),
                    Tok::Punct('!'),
                ]
                && let Some(name) = ident(w.get(6))
            {
                macros.insert(name.to_string(), m.clone());
            }
        }
    }
    let modules: BTreeMap<Module, PathBuf> = parsed
        .iter()
        .map(|(m, (f, _))| (m.clone(), f.clone()))
        .collect();

    let resolve = |current: &Module, path: &[String]| -> Option<Module> {
        let mut at: Module;
        let mut rest = path;
        match path.first().map(String::as_str) {
            Some("crate") => {
                at = vec![];
                rest = &path[1..];
            }
            Some("self") => {
                at = current.clone();
                rest = &path[1..];
            }
            Some("super") => {
                at = current.clone();
                while rest.first().map(String::as_str) == Some("super") {
                    at.pop();
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                let mut child = current.clone();
                child.push(first.to_string());
                if modules.contains_key(&child) {
                    at = current.clone();
                } else {
                    return None; // another crate (std, tokio, …) or a local item
                }
            }
            None => return None,
        }
        if at.is_empty()
            && rest.len() == 1
            && let Some(m) = macros.get(&rest[0])
        {
            return Some(m.clone());
        }
        for seg in rest {
            let mut next = at.clone();
            next.push(seg.clone());
            if modules.contains_key(&next) {
                at = next;
            } else {
                break;
            }
        }
        Some(at)
    };

    let mut edges: BTreeMap<Module, BTreeMap<Module, String>> = BTreeMap::new();
    for (m, (_, toks)) in &parsed {
        let mut paths = Vec::new();
        let mut i = 0;
        while i < toks.len() {
            if ident(toks.get(i)) == Some("use")
                && !matches!(toks.get(i.wrapping_sub(1)), Some(Tok::Path))
            {
                i = use_tree(toks, i + 1, &[], &mut paths);
                continue;
            }
            if let Some(first) = ident(toks.get(i))
                && toks.get(i + 1) == Some(&Tok::Path)
                && !matches!(toks.get(i.wrapping_sub(1)), Some(Tok::Path))
            {
                let mut path = vec![first.to_string()];
                let mut j = i + 1;
                while toks.get(j) == Some(&Tok::Path) {
                    match ident(toks.get(j + 1)) {
                        Some(s) => {
                            path.push(s.to_string());
                            j += 2;
                        }
                        None => break,
                    }
                }
                paths.push(path);
                i = j;
                continue;
            }
            i += 1;
        }
        for p in paths {
            if let Some(target) = resolve(m, &p)
                && target != *m
            {
                edges
                    .entry(m.clone())
                    .or_default()
                    .entry(target)
                    .or_insert_with(|| p.join("::"));
            }
        }
    }
    Graph { modules, edges }
}

/// Every cycle of length two, and every import of an enclosing module, one
/// line each.
fn cycles(g: &Graph) -> Vec<String> {
    let mut found = Vec::new();
    for (from, tos) in &g.edges {
        for (to, via) in tos {
            if from.starts_with(to) {
                found.push(format!(
                    "{} imports its enclosing module {} ({via})",
                    name(from),
                    name(to)
                ));
            } else if from < to
                && !to.starts_with(from)
                && let Some(back) = g.edges.get(to).and_then(|t| t.get(from))
            {
                found.push(format!("{} <-> {} ({via}; {back})", name(from), name(to)));
            }
        }
    }
    found
}

#[test]
fn the_scanner_sees_the_crate() {
    let g = graph();
    // A scanner that resolves nothing would pass the check below vacuously.
    assert!(g.modules.len() > 50, "{} modules", g.modules.len());
    let engine_load = vec!["engine".to_string(), "load".to_string()];
    let star = vec!["engine".to_string(), "load".to_string(), "star".to_string()];
    assert!(g.modules.contains_key(&star));
    assert!(
        g.edges
            .get(&engine_load)
            .is_some_and(|t| t.contains_key(&star)),
        "engine::load uses its star strategy"
    );
    let proto = vec!["proto".to_string()];
    let importers = g.edges.values().filter(|t| t.contains_key(&proto)).count();
    assert!(importers > 5, "{importers} modules import crate::proto");
}

#[test]
fn the_scanner_finds_a_cycle() {
    let src = "use crate::b::X;\n#[cfg(test)]\nmod tests { use crate::c::Y; }";
    let (toks, _) = without_tests(&tokenize(src));
    let mut paths = Vec::new();
    let i = toks
        .iter()
        .position(|t| *t == Tok::Ident("use".into()))
        .unwrap();
    use_tree(&toks, i + 1, &[], &mut paths);
    assert_eq!(paths, vec![vec!["crate", "b", "X"]]);
    assert!(
        !toks.contains(&Tok::Ident("c".into())),
        "test items stripped"
    );

    let a = vec!["a".to_string()];
    let b = vec!["b".to_string()];
    let ab = vec!["a".to_string(), "b".to_string()];
    let g = Graph {
        modules: BTreeMap::new(),
        edges: BTreeMap::from([
            (
                a.clone(),
                BTreeMap::from([(b.clone(), "crate::b::X".into())]),
            ),
            (
                b.clone(),
                BTreeMap::from([(a.clone(), "crate::a::Y".into())]),
            ),
            (
                ab.clone(),
                BTreeMap::from([(a.clone(), "crate::a::Z".into())]),
            ),
        ]),
    };
    assert_eq!(
        cycles(&g),
        vec![
            "crate::a <-> crate::b (crate::b::X; crate::a::Y)".to_string(),
            "crate::a::b imports its enclosing module crate::a (crate::a::Z)".to_string(),
        ]
    );
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let g = graph();
    for (from, tos) in &g.edges {
        for (to, via) in tos {
            println!("{} -> {} ({via})", name(from), name(to));
        }
    }
    let found = cycles(&g);
    assert!(
        found.is_empty(),
        "{} import cycles:\n{}",
        found.len(),
        found.join("\n")
    );
}
