//! Checks of the workspace itself, run by `cargo test`.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tools/ sits in the workspace root")
}

#[test]
fn no_crate_has_modules_that_import_each_other() {
    let cycles = tools::module_graph::workspace_cycles(root()).unwrap();
    let text: String = cycles.iter().map(|c| c.to_string()).collect();
    assert!(
        cycles.is_empty(),
        "import cycles between modules (move what both need into a module of its own, or turn one \
         reference around):\n{text}"
    );
}

#[test]
fn the_docs_figures_tables_are_the_ones_the_bench_records_make() {
    let stale = tools::bench_tables::stale(root()).unwrap();
    assert!(
        stale.is_empty(),
        "{stale:?} differ from bench/results: run `cargo run -p tools --bin bench-tables -- write` and commit"
    );
}
