//! Answers about the studio from its own documentation: the docs are cut into sections (at their
//! headings, long sections at paragraphs), each embedded once with the MiniLM sentence encoder, and a
//! question's nearest sections (cosine similarity of the unit-length embeddings) go into the language
//! model's context, named so that the answer can cite them.

use anyhow::Result;
use candle_core::Tensor;

use crate::classifier::SentenceEncoder;

/// A section's text at most, in characters: about what MiniLM reads (256 tokens), and small enough that a
/// few of them fit a small model's prompt.
pub const CHUNK_CHARS: usize = 900;

/// The start of a section that is matched against a question, in characters.
const MATCHED_CHARS: usize = 400;

/// A piece of a document.
#[derive(Debug, Clone, PartialEq)]
pub struct DocChunk {
    /// The document, e.g. `docs/training.md`.
    pub doc: String,
    /// Its section's heading (the document's title for text before the first heading).
    pub heading: String,
    pub text: String,
}

impl DocChunk {
    /// How an answer cites it: `docs/training.md § LoRA training`.
    pub fn citation(&self) -> String {
        format!("{} § {}", self.doc, self.heading)
    }
}

/// Cuts a Markdown document into sections at its headings, and sections longer than `CHUNK_CHARS` at
/// paragraphs (a paragraph longer than that at a line, then at a character boundary).
pub fn chunk_markdown(doc: &str, text: &str) -> Vec<DocChunk> {
    let mut chunks = Vec::new();
    let mut heading = doc.to_string();
    let mut section = String::new();
    let mut in_code = false;
    let flush = |heading: &str, section: &mut String, chunks: &mut Vec<DocChunk>| {
        for piece in split_bounded(section.trim()) {
            chunks.push(DocChunk {
                doc: doc.to_string(),
                heading: heading.to_string(),
                text: piece,
            });
        }
        section.clear();
    };
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && line.starts_with('#') {
            flush(&heading, &mut section, &mut chunks);
            heading = line.trim_start_matches('#').trim().to_string();
            continue;
        }
        section.push_str(line);
        section.push('\n');
    }
    flush(&heading, &mut section, &mut chunks);
    chunks
}

/// `text` in pieces of at most `CHUNK_CHARS`, cut at blank lines, then lines, then characters.
fn split_bounded(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut piece = String::new();
    let units = text.split("\n\n").flat_map(|paragraph| {
        if paragraph.chars().count() <= CHUNK_CHARS {
            vec![paragraph.to_string()]
        } else {
            paragraph
                .lines()
                .flat_map(|line| {
                    let chars: Vec<char> = line.chars().collect();
                    chars
                        .chunks(CHUNK_CHARS)
                        .map(|c| c.iter().collect::<String>())
                        .collect::<Vec<_>>()
                })
                .collect()
        }
    });
    for unit in units {
        let unit = unit.trim();
        if unit.is_empty() {
            continue;
        }
        if !piece.is_empty() && piece.chars().count() + 2 + unit.chars().count() > CHUNK_CHARS {
            pieces.push(std::mem::take(&mut piece));
        }
        if !piece.is_empty() {
            piece.push_str("\n\n");
        }
        piece.push_str(unit);
    }
    if !piece.is_empty() {
        pieces.push(piece);
    }
    pieces
}

/// The documents' sections with their embeddings, searched by a question's.
pub struct DocIndex {
    chunks: Vec<DocChunk>,
    /// `[chunks, hidden]`, unit rows.
    embeddings: Tensor,
}

impl DocIndex {
    /// Cuts `docs` (name, Markdown) into sections and embeds them all.
    pub fn build(encoder: &SentenceEncoder, docs: &[(&str, &str)]) -> Result<DocIndex> {
        let chunks: Vec<DocChunk> = docs
            .iter()
            .flat_map(|(name, text)| chunk_markdown(name, text))
            .collect();
        // The heading is part of what is matched: it often names the topic the text only implies. Only
        // the section's start is embedded with it: it says what the section is about, and the shorter
        // input makes indexing every doc at start a few times cheaper on a small CPU.
        let texts: Vec<String> = chunks
            .iter()
            .map(|c| {
                let start: String = c.text.chars().take(MATCHED_CHARS).collect();
                format!("{}\n{start}", c.heading)
            })
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let embeddings = encoder.embed_all(&refs, 16)?;
        Ok(DocIndex { chunks, embeddings })
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The `k` sections nearest to `question`, nearest first, with their cosine similarity.
    pub fn search(
        &self,
        encoder: &SentenceEncoder,
        question: &str,
        k: usize,
    ) -> Result<Vec<(f32, &DocChunk)>> {
        if self.chunks.is_empty() {
            return Ok(Vec::new());
        }
        let query = encoder.embed(&[question])?;
        let scores: Vec<f32> = self.embeddings.matmul(&query.t()?)?.squeeze(1)?.to_vec1()?;
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        Ok(order
            .into_iter()
            .take(k)
            .map(|i| (scores[i], &self.chunks[i]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_cut_at_headings_but_not_inside_code_and_long_sections_at_paragraphs() {
        let text = format!(
            "# Title\nintro\n\n## Train\n```sh\n# not a heading\nstudio train\n```\n\n## Long\n{}\n\n{}\n",
            "a".repeat(600),
            "b".repeat(600)
        );
        let chunks = chunk_markdown("docs/x.md", &text);
        let headings: Vec<&str> = chunks.iter().map(|c| c.heading.as_str()).collect();
        assert_eq!(headings, ["Title", "Train", "Long", "Long"]);
        assert!(chunks[1].text.contains("# not a heading"));
        assert!(chunks.iter().all(|c| c.text.chars().count() <= CHUNK_CHARS));
        assert_eq!(chunks[1].citation(), "docs/x.md § Train");
        let huge = chunk_markdown("d", &"word ".repeat(1000));
        assert!(huge.len() >= 5);
        assert!(huge.iter().all(|c| c.text.chars().count() <= CHUNK_CHARS));
    }
}
