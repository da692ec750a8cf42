//! The studio's own documentation, built into the binary (the chat answers questions about the studio
//! from it, `docs/chat.md`): the README and every `docs/*.md`, as they were when the server was built.

/// (name, Markdown) of every bundled document.
pub const STUDIO_DOCS: &[(&str, &str)] = &[
    ("README.md", include_str!("../../README.md")),
    (
        "docs/builtin-model.md",
        include_str!("../../docs/builtin-model.md"),
    ),
    ("docs/chat.md", include_str!("../../docs/chat.md")),
    (
        "docs/classifier.md",
        include_str!("../../docs/classifier.md"),
    ),
    (
        "docs/deployment.md",
        include_str!("../../docs/deployment.md"),
    ),
    ("docs/editing.md", include_str!("../../docs/editing.md")),
    ("docs/formats.md", include_str!("../../docs/formats.md")),
    ("docs/lora.md", include_str!("../../docs/lora.md")),
    ("docs/memory.md", include_str!("../../docs/memory.md")),
    (
        "docs/performance.md",
        include_str!("../../docs/performance.md"),
    ),
    ("docs/server.md", include_str!("../../docs/server.md")),
    ("docs/training.md", include_str!("../../docs/training.md")),
    ("docs/ui.md", include_str!("../../docs/ui.md")),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_document_of_docs_is_bundled() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
        for entry in std::fs::read_dir(docs).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "md") {
                let name = format!("docs/{}", path.file_name().unwrap().to_string_lossy());
                assert!(
                    STUDIO_DOCS.iter().any(|(n, _)| *n == name),
                    "{name} is not bundled: add it to STUDIO_DOCS in server/src/studio_docs.rs"
                );
            }
        }
    }
}
