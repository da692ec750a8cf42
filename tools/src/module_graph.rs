//! The module graph of a crate, read from its sources, and the import cycles in it.
//!
//! Modules are nodes; `crate::`, `super::` and `self::` paths (in `use` items and in code) are edges. An
//! edge is lifted to the two children of the modules' nearest common parent that contain its ends: so for
//! every module, its children form a graph, and that graph must have no cycle. A child's reference to its
//! own ancestor (`super::Item` for an item the parent defines) and a parent's to its descendants are the
//! tree itself and not counted; a name the parent only re-exports (`pub use child::Item`) is followed to
//! the module that defines it, so `super::Item` through a re-export is an edge to that sibling.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use syn::visit::Visit;

/// A module's path inside its crate: `["models", "flux", "model"]`; the crate root is `[]`.
type ModPath = Vec<String>;

struct Module {
    file: PathBuf,
    /// Child modules by name.
    children: BTreeSet<String>,
    /// Names brought in by `use` (renamed where renamed) -> the absolute path they name.
    imports: HashMap<String, ModPath>,
    /// Every crate-internal path the module names, absolute, with the line it is on.
    refs: Vec<(ModPath, usize)>,
}

/// One crate's modules.
pub struct CrateGraph {
    name: String,
    /// Files are shown relative to this folder.
    base: PathBuf,
    modules: BTreeMap<ModPath, Module>,
}

/// A reference that closes a cycle: `from` (a child of `parent`) uses `to` (another child) at `site`.
#[derive(Debug, Clone)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub site: String,
}

/// Children of one module that import each other in a cycle, with one reference for each edge.
#[derive(Debug, Clone)]
pub struct Cycle {
    pub krate: String,
    pub parent: String,
    pub members: Vec<String>,
    pub edges: Vec<Edge>,
}

impl fmt::Display for Cycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parent = if self.parent.is_empty() {
            "crate root".to_string()
        } else {
            self.parent.clone()
        };
        writeln!(
            f,
            "{}: the modules {{{}}} under {} import each other:",
            self.krate,
            self.members.join(", "),
            parent
        )?;
        for e in &self.edges {
            writeln!(f, "  {} -> {}  ({})", e.from, e.to, e.site)?;
        }
        Ok(())
    }
}

impl CrateGraph {
    /// Reads the crate whose root file is `root` (src/lib.rs or src/main.rs), following `mod` items.
    pub fn read(name: &str, root: &Path, base: &Path) -> Result<Self> {
        let mut graph = CrateGraph {
            name: name.to_string(),
            base: base.to_path_buf(),
            modules: BTreeMap::new(),
        };
        let dir = root
            .parent()
            .context("root file has no folder")?
            .to_path_buf();
        graph.read_file(Vec::new(), root, &dir)?;
        Ok(graph)
    }

    /// `dir` is where the file's own `mod x;` children live.
    fn read_file(&mut self, path: ModPath, file: &Path, dir: &Path) -> Result<()> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let ast = syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
        self.read_items(path, file, dir, &ast.items)
    }

    fn read_items(
        &mut self,
        path: ModPath,
        file: &Path,
        dir: &Path,
        items: &[syn::Item],
    ) -> Result<()> {
        let mut module = Module {
            file: file.to_path_buf(),
            children: BTreeSet::new(),
            imports: HashMap::new(),
            refs: Vec::new(),
        };
        let mut nested = Vec::new();
        for item in items {
            if let syn::Item::Mod(m) = item {
                let name = m.ident.to_string();
                module.children.insert(name.clone());
                nested.push(m);
            }
        }
        let children = module.children.clone();
        let mut collect = Collector {
            here: &path,
            children: &children,
            module: &mut module,
        };
        for item in items {
            if !matches!(item, syn::Item::Mod(_)) {
                collect.visit_item(item);
            }
        }
        self.modules.insert(path.clone(), module);
        for m in nested {
            let mut child = path.clone();
            child.push(m.ident.to_string());
            if let Some((_, items)) = &m.content {
                // An inline module (`mod tests { .. }`): its own file-modules would live in dir/name/.
                self.read_items(child, file, &dir.join(m.ident.to_string()), items)?;
                continue;
            }
            let explicit = m.attrs.iter().find_map(|a| match &a.meta {
                syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
                    syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) => Some(s.value()),
                    _ => None,
                },
                _ => None,
            });
            let name = m.ident.to_string();
            let (child_file, child_dir) = match explicit {
                Some(p) => {
                    let f = file.parent().unwrap_or(dir).join(p);
                    let d = f.parent().unwrap_or(dir).to_path_buf();
                    (f, d)
                }
                None if dir.join(format!("{name}.rs")).is_file() => {
                    (dir.join(format!("{name}.rs")), dir.join(&name))
                }
                None if dir.join(&name).join("mod.rs").is_file() => {
                    (dir.join(&name).join("mod.rs"), dir.join(&name))
                }
                None => anyhow::bail!(
                    "{}: module `{name}` has no file in {}",
                    file.display(),
                    dir.display()
                ),
            };
            self.read_file(child, &child_file, &child_dir)?;
        }
        Ok(())
    }

    /// The module a crate-absolute path ends in, following `use` re-exports of the names it passes.
    fn resolve(&self, target: &[String], depth: usize) -> ModPath {
        let mut here: ModPath = Vec::new();
        for (i, seg) in target.iter().enumerate() {
            let module = &self.modules[&here];
            if module.children.contains(seg) {
                here.push(seg.clone());
                continue;
            }
            if let Some(next) = module.imports.get(seg) {
                if depth < 8 {
                    let mut full = next.clone();
                    full.extend_from_slice(&target[i + 1..]);
                    return self.resolve(&full, depth + 1);
                }
            }
            break;
        }
        here
    }

    /// Every cycle among the children of any module.
    pub fn cycles(&self) -> Vec<Cycle> {
        // parent -> (from child, to child) -> first site.
        let mut lifted: BTreeMap<ModPath, BTreeMap<(String, String), String>> = BTreeMap::new();
        for (from, module) in &self.modules {
            for (target, line) in &module.refs {
                let to = self.resolve(target, 0);
                let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
                if common == from.len() || common == to.len() {
                    continue; // the same module, an ancestor or a descendant
                }
                let parent = from[..common].to_vec();
                let file = module.file.strip_prefix(&self.base).unwrap_or(&module.file);
                let site = format!("{}:{} names {}", file.display(), line, show(target));
                lifted
                    .entry(parent)
                    .or_default()
                    .entry((from[common].clone(), to[common].clone()))
                    .or_insert(site);
            }
        }
        let mut out = Vec::new();
        for (parent, edges) in lifted {
            for scc in strongly_connected(&edges) {
                let members: BTreeSet<&String> = scc.iter().collect();
                let edges = edges
                    .iter()
                    .filter(|((a, b), _)| members.contains(a) && members.contains(b))
                    .map(|((a, b), site)| Edge {
                        from: a.clone(),
                        to: b.clone(),
                        site: site.clone(),
                    })
                    .collect();
                out.push(Cycle {
                    krate: self.name.clone(),
                    parent: show(&parent),
                    members: scc,
                    edges,
                });
            }
        }
        out
    }
}

fn show(path: &[String]) -> String {
    path.join("::")
}

/// Components of more than one node, by Tarjan's algorithm.
fn strongly_connected(edges: &BTreeMap<(String, String), String>) -> Vec<Vec<String>> {
    let mut nodes: BTreeSet<&String> = BTreeSet::new();
    let mut next: BTreeMap<&String, Vec<&String>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        nodes.insert(a);
        nodes.insert(b);
        next.entry(a).or_default().push(b);
    }
    struct State<'a> {
        index: BTreeMap<&'a String, usize>,
        low: BTreeMap<&'a String, usize>,
        stack: Vec<&'a String>,
        on_stack: BTreeSet<&'a String>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(v: &'a String, next: &BTreeMap<&'a String, Vec<&'a String>>, s: &mut State<'a>) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in next.get(v).map(Vec::as_slice).unwrap_or(&[]) {
            if !s.index.contains_key(w) {
                visit(w, next, s);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in nodes {
        if !s.index.contains_key(v) {
            visit(v, &next, &mut s);
        }
    }
    s.out
}

/// Collects one module's `use` items and `crate::`/`super::`/`self::` paths.
struct Collector<'m> {
    here: &'m ModPath,
    children: &'m BTreeSet<String>,
    module: &'m mut Module,
}

impl Collector<'_> {
    /// A path's segments made crate-absolute, or None for another crate's path.
    fn absolute(&self, segs: &[String]) -> Option<ModPath> {
        let first = segs.first()?;
        let mut base = match first.as_str() {
            "crate" => Vec::new(),
            "self" => self.here.clone(),
            "super" => self.here.clone(),
            _ if self.children.contains(first) => {
                let mut p = self.here.clone();
                p.extend_from_slice(segs);
                return Some(p);
            }
            _ => return None,
        };
        let mut rest = &segs[1..];
        if first == "super" {
            base.pop()?;
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        base.extend_from_slice(rest);
        Some(base)
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree, line: usize) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree, line);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.use_leaf(prefix, &n.ident.to_string(), None, line),
            syn::UseTree::Rename(r) => self.use_leaf(
                prefix,
                &r.ident.to_string(),
                Some(r.rename.to_string()),
                line,
            ),
            syn::UseTree::Glob(_) => {
                if let Some(abs) = self.absolute(prefix) {
                    self.module.refs.push((abs, line));
                }
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t, line);
                }
            }
        }
    }

    fn use_leaf(&mut self, prefix: &[String], name: &str, rename: Option<String>, line: usize) {
        let mut segs = prefix.to_vec();
        if name != "self" {
            segs.push(name.to_string());
        }
        if let Some(abs) = self.absolute(&segs) {
            let local = rename.unwrap_or_else(|| segs.last().cloned().unwrap_or_default());
            self.module.imports.insert(local, abs.clone());
            self.module.refs.push((abs, line));
        }
    }
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let line = u.use_token.span.start().line;
        self.use_tree(&mut Vec::new(), &u.tree, line);
    }

    fn visit_item_mod(&mut self, _: &'ast syn::ItemMod) {
        // A nested module is a node of its own, read separately.
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if matches!(
            segs.first().map(String::as_str),
            Some("crate" | "super" | "self")
        ) {
            if let Some(abs) = self.absolute(&segs) {
                let line = p.segments[0].ident.span().start().line;
                self.module.refs.push((abs, line));
            }
        }
        syn::visit::visit_path(self, p);
    }
}

/// The cycles of every crate of the workspace at `root`: each member's src/lib.rs and src/main.rs, and
/// each file of src/bin/.
pub fn workspace_cycles(root: &Path) -> Result<Vec<Cycle>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let dir = entry?.path();
        let src = dir.join("src");
        if !dir.join("Cargo.toml").is_file() || !src.is_dir() {
            continue;
        }
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let mut roots = Vec::new();
        for f in ["lib.rs", "main.rs"] {
            if src.join(f).is_file() {
                roots.push(src.join(f));
            }
        }
        if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
            for b in bins {
                let b = b?.path();
                if b.extension().is_some_and(|e| e == "rs") {
                    roots.push(b);
                } else if b.join("main.rs").is_file() {
                    roots.push(b.join("main.rs"));
                }
            }
        }
        for r in roots {
            let label = format!("{name} ({})", r.strip_prefix(root).unwrap_or(&r).display());
            out.extend(CrateGraph::read(&label, &r, root)?.cycles());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }

    #[test]
    fn two_sibling_modules_that_import_each_other_are_a_cycle() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &[
                ("src/lib.rs", "pub mod a;\npub mod b;\n"),
                ("src/a.rs", "use crate::b::B;\npub struct A(B);\n"),
                ("src/b.rs", "pub struct B;\nfn f(_: super::a::A) {}\n"),
            ],
        );
        let cycles = CrateGraph::read("t", &dir.path().join("src/lib.rs"), dir.path())
            .unwrap()
            .cycles();
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert_eq!(cycles[0].members, ["a", "b"]);
        assert!(
            cycles[0]
                .edges
                .iter()
                .any(|e| e.site.contains("src/b.rs:2")),
            "{:?}",
            cycles[0].edges
        );
    }

    #[test]
    fn a_cycle_through_a_parents_re_export_is_found_in_nested_folders() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &[
                ("src/lib.rs", "pub mod models;\n"),
                (
                    "src/models/mod.rs",
                    "mod model;\nmod train;\npub use model::Model;\npub use train::Grads;\n",
                ),
                (
                    "src/models/model.rs",
                    "pub struct Model;\nimpl Model { fn g(&self, _: super::Grads) {} }\n",
                ),
                (
                    "src/models/train.rs",
                    "use super::Model;\npub struct Grads(Model);\n",
                ),
            ],
        );
        let cycles = CrateGraph::read("t", &dir.path().join("src/lib.rs"), dir.path())
            .unwrap()
            .cycles();
        assert_eq!(cycles.len(), 1, "{cycles:?}");
        assert_eq!(cycles[0].parent, "models");
    }

    #[test]
    fn a_child_using_its_parent_and_one_way_siblings_are_no_cycle() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &[
                ("src/lib.rs", "pub mod a;\npub mod b;\npub struct Root;\n"),
                ("src/a.rs", "use crate::b::B;\nuse crate::Root;\npub struct A(B, Root);\nmod tests { use super::*; }\n"),
                ("src/b.rs", "pub struct B;\n"),
            ],
        );
        let cycles = CrateGraph::read("t", &dir.path().join("src/lib.rs"), dir.path())
            .unwrap()
            .cycles();
        assert!(cycles.is_empty(), "{cycles:?}");
    }
}
