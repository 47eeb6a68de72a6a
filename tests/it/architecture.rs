//! The layout is the architecture: `ARCHITECTURE.md`'s layer table says what each top-level
//! module of `src/` may import, and this test reads the source to check that every `crate::`
//! path of each module stays within its row, that every module has a row, and that the modules'
//! imports form no cycle. It reads files only; no downlink code runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The table between `<!-- layers -->` and `<!-- /layers -->`: module -> what it may import.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md at the top of the repository");
    let start = text
        .find("<!-- layers -->")
        .expect("a <!-- layers --> marker");
    let end = text
        .find("<!-- /layers -->")
        .expect("a <!-- /layers --> marker");
    let mut table = BTreeMap::new();
    for line in text[start..end].lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [module, _layer, imports, ..] = cells[..] else {
            panic!("a layer row needs module | layer | may import: {line}");
        };
        let names = |cell: &str| -> BTreeSet<String> {
            cell.split(',')
                .map(|w| w.trim().trim_matches('`').to_owned())
                .filter(|w| !w.is_empty() && w != "—")
                .collect()
        };
        table.insert(module.trim_matches('`').to_owned(), names(imports));
    }
    table
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir)
        .expect("a source directory")
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules named after `crate::` in `text`, `use crate::{a, b::c}` groups included.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut item, mut end) = (0, String::new(), group.len());
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = i;
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            found.insert(ident(&item));
            rest = &group[end..];
        } else {
            found.insert(ident(rest));
        }
    }
    found.remove("");
    found
}

/// Each top-level module of `src/` (a file `x.rs` and its folder `x/`) and the other top-level
/// modules its code names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(ROOT).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let top_of = |path: &Path| -> String {
        let first = path
            .strip_prefix(&src)
            .expect("under src")
            .components()
            .next();
        let name = first.map(|c| c.as_os_str().to_string_lossy().into_owned());
        name.unwrap_or_default().trim_end_matches(".rs").to_owned()
    };
    let modules: BTreeSet<String> = all
        .iter()
        .map(|p| top_of(p))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for path in &all {
        let module = top_of(path);
        let Some(uses) = graph.get_mut(&module) else {
            continue;
        };
        let text = std::fs::read_to_string(path).expect("a source file");
        uses.extend(
            crate_paths(&text)
                .into_iter()
                .filter(|m| modules.contains(m) && *m != module),
        );
    }
    graph
}

#[test]
fn every_import_runs_down_the_layer_table_and_none_runs_in_a_circle() {
    let table = allowed();
    let graph = imports();
    let missing: Vec<&String> = graph.keys().filter(|m| !table.contains_key(*m)).collect();
    assert!(
        missing.is_empty(),
        "modules without a row in ARCHITECTURE.md: {missing:?}"
    );
    let stale: Vec<&String> = table.keys().filter(|m| !graph.contains_key(*m)).collect();
    assert!(
        stale.is_empty(),
        "rows for modules that no longer exist: {stale:?}"
    );
    let mut wrong = Vec::new();
    for (module, uses) in &graph {
        for used in uses.difference(&table[module]) {
            wrong.push(format!("{module} -> {used}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports the layer table does not allow: {wrong:?}"
    );
    // No cycle: repeatedly take away the modules that import nothing left.
    let mut left = graph.clone();
    while !left.is_empty() {
        let leaves: Vec<String> = left
            .iter()
            .filter(|(_, uses)| uses.iter().all(|u| !left.contains_key(u)))
            .map(|(m, _)| m.clone())
            .collect();
        assert!(
            !leaves.is_empty(),
            "an import cycle among {:?}",
            left.keys()
        );
        for m in leaves {
            left.remove(&m);
        }
    }
}

#[test]
fn crate_paths_are_read_from_use_groups_and_paths() {
    let found = crate_paths(
        "use crate::store::{self, Finish};\nuse crate::{status::Status, time, exec::{spawn, procs}};\nlet x = crate::metrics::Metrics::new();",
    );
    let names: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(names, ["exec", "metrics", "status", "store", "time"]);
}
