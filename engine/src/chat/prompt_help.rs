//! Help with prompts through the language model: a short image request becomes a detailed FLUX prompt,
//! and a follow-up rewrites the last prompt with its change. The instructions are short and shown by
//! example (few-shot turns), which even the 135M default model follows; what it writes is then cut to one
//! line and a bounded length; a rewrite that lost the user's subject gets it back in front, and a follow-up
//! whose change the model did not make gets it merged in.

use app::prompt::{content_words, merge_follow_up, subject, MAX_HELPED_PROMPT_CHARS};

use super::{Role, SamplingSettings, Turn};

const SYSTEM: &str =
    "You write prompts for an image generator. Rewrite the request as one detailed \
image prompt: the subject first, then setting, lighting, colours and style, separated by commas. \
Answer with the prompt only, on one line.";

const CHANGE_SYSTEM: &str = "You edit prompts for an image generator. Rewrite the previous prompt \
with the requested change: keep its subject and everything the change does not touch. Answer with the \
new prompt only, on one line.";

/// (request, prompt) examples of a new image.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "a cat",
        "a cat, fluffy ginger tabby curled up on a sunny windowsill, soft morning light, warm colours, \
         shallow depth of field, detailed fur, 35mm photo",
    ),
    (
        "castle",
        "castle, a medieval stone castle on a misty hilltop, dramatic clouds, golden hour light, \
         highly detailed fantasy illustration",
    ),
    (
        "a bowl of ramen",
        "a bowl of ramen, steaming noodles with a soft egg and green onions in a dark ceramic bowl, \
         wooden table, warm side light, food photography",
    ),
];

/// (previous prompt, change, new prompt) examples of a follow-up.
const CHANGE_EXAMPLES: &[(&str, &str, &str)] = &[
    (
        "a cat, fluffy ginger tabby curled up on a sunny windowsill, soft morning light, 35mm photo",
        "at night",
        "a cat, fluffy ginger tabby curled up on a windowsill at night, moonlight, deep blue shadows, \
         35mm photo",
    ),
    (
        "castle, a medieval stone castle on a misty hilltop, golden hour light, fantasy illustration",
        "make it blue",
        "castle, a blue medieval stone castle on a misty hilltop, golden hour light, fantasy \
         illustration",
    ),
];

fn change_request(previous: &str, change: &str) -> String {
    format!("Previous prompt: {previous}\nChange: {change}")
}

/// The turns that ask the model for a prompt: a new image from `request`, or, with `previous`, that
/// prompt rewritten with the change `request` asks for.
pub fn rewrite_turns(request: &str, previous: Option<&str>) -> Vec<Turn> {
    let mut turns = Vec::new();
    match previous {
        None => {
            turns.push(Turn::new(Role::System, SYSTEM));
            for (ask, prompt) in EXAMPLES {
                turns.push(Turn::new(Role::User, *ask));
                turns.push(Turn::new(Role::Assistant, *prompt));
            }
            turns.push(Turn::new(Role::User, request.trim()));
        }
        Some(previous) => {
            turns.push(Turn::new(Role::System, CHANGE_SYSTEM));
            for (before, change, after) in CHANGE_EXAMPLES {
                turns.push(Turn::new(Role::User, change_request(before, change)));
                turns.push(Turn::new(Role::Assistant, *after));
            }
            turns.push(Turn::new(
                Role::User,
                change_request(previous.trim(), request.trim()),
            ));
        }
    }
    turns
}

/// Greedy, short, and with a repeat penalty (small models repeat a phrase over and over otherwise):
/// a prompt, not an essay.
pub fn sampling() -> SamplingSettings {
    SamplingSettings {
        max_tokens: 72,
        temperature: 0.0,
        ..SamplingSettings::default()
    }
}

/// Phrases a prompt keeps at most: small models go on listing long after the picture is described.
const MAX_PHRASES: usize = 10;

/// The prompt in what the model wrote: its first line (up to a full stop) without a "Prompt:" label or
/// quotes, phrases said twice or of digits alone (small models add years) dropped, at most `MAX_PHRASES`
/// cut at the last whole phrase within `MAX_HELPED_PROMPT_CHARS`. What the model left out is put back:
/// `keep` (the request's subject, or the previous prompt's) in front when any of its words is missing,
/// and a follow-up's `change` merged as one more phrase (`app::prompt::merge_follow_up`) when the model
/// did not make it.
pub fn finish_prompt(written: &str, keep: &str, change: Option<&str>) -> String {
    let line = written
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut line = line;
    for label in ["new prompt:", "prompt:"] {
        if line.to_lowercase().starts_with(label) {
            line = line[label.len()..].trim();
        }
    }
    let line = line.split(". ").next().unwrap_or("");
    let line = line.trim_matches(['"', '\'', '`', ' ', '.']);
    let mut phrases: Vec<&str> = Vec::new();
    for phrase in line.split(',').map(str::trim) {
        let digits_only = phrase.chars().all(|c| !c.is_alphabetic());
        if !digits_only && !phrases.iter().any(|p| p.eq_ignore_ascii_case(phrase)) {
            phrases.push(phrase);
        }
    }
    let keep = keep.trim();
    let lower = line.to_lowercase();
    let lost_subject = content_words(keep)
        .iter()
        .any(|w| !lower.contains(w.as_str()));
    if lost_subject && !keep.is_empty() {
        phrases.insert(0, keep);
    }
    phrases.truncate(MAX_PHRASES);
    let mut prompt = String::new();
    for phrase in phrases {
        let next = if prompt.is_empty() {
            phrase.to_string()
        } else {
            format!("{prompt}, {phrase}")
        };
        if next.chars().count() > MAX_HELPED_PROMPT_CHARS {
            break;
        }
        prompt = next;
    }
    if prompt.is_empty() {
        // A single phrase longer than the bound: cut it at a word.
        let cut: String = line.chars().take(MAX_HELPED_PROMPT_CHARS).collect();
        prompt = match cut.rsplit_once(' ') {
            Some((head, _)) if !head.is_empty() => head.to_string(),
            _ => cut,
        };
    }
    if let Some(change) = change {
        let lower = prompt.to_lowercase();
        if content_words(change)
            .iter()
            .any(|w| !lower.contains(w.as_str()))
        {
            let room = MAX_HELPED_PROMPT_CHARS.saturating_sub(change.chars().count() + 2);
            while prompt.chars().count() > room {
                match prompt.rsplit_once(", ") {
                    Some((head, _)) => prompt = head.to_string(),
                    None => break,
                }
            }
            prompt = merge_follow_up(&prompt, change);
        }
    }
    prompt
}

/// What a rewrite must keep: the request itself for a new image, the previous prompt's subject for a
/// follow-up.
pub fn kept_subject<'a>(request: &'a str, previous: Option<&'a str>) -> &'a str {
    match previous {
        Some(previous) => subject(previous),
        None => request.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_asked_by_example_and_a_follow_up_carries_the_previous_prompt() {
        let turns = rewrite_turns("red apple", None);
        assert_eq!(turns[0].role, Role::System);
        assert_eq!(turns.last().unwrap().content, "red apple");
        assert_eq!(turns.len(), 2 + 2 * EXAMPLES.len());
        let turns = rewrite_turns("same but at night", Some("a red apple, studio light"));
        assert_eq!(
            turns.last().unwrap().content,
            "Previous prompt: a red apple, studio light\nChange: same but at night"
        );
    }

    #[test]
    fn a_written_prompt_is_one_clean_bounded_line_that_keeps_the_subject() {
        assert_eq!(
            finish_prompt(
                "Prompt: \"red apple, shiny, shiny, 2019, studio light. A story\"\nmore text",
                "red apple",
                None
            ),
            "red apple, shiny, studio light"
        );
        assert_eq!(
            finish_prompt("a shiny fruit on a table, studio light", "red apple", None),
            "red apple, a shiny fruit on a table, studio light"
        );
        let long = vec!["a very long phrase about the light"; 40].join(", ");
        let long = format!("red apple, {long}, {}", "x".repeat(20));
        let bounded = finish_prompt(&long, "red apple", None);
        assert!(bounded.chars().count() <= MAX_HELPED_PROMPT_CHARS);
        assert!(bounded.starts_with("red apple"));
        let one_phrase = "word ".repeat(200);
        assert!(
            finish_prompt(&one_phrase, "word", None).chars().count() <= MAX_HELPED_PROMPT_CHARS
        );
        // A follow-up's change the model left out is merged in; one it made is not added twice.
        assert_eq!(
            finish_prompt("a red apple, on a table", "a red apple", Some("at night")),
            "a red apple, on a table, at night"
        );
        assert_eq!(
            finish_prompt(
                "a red apple on a table at night, moonlight",
                "a red apple",
                Some("at night")
            ),
            "a red apple on a table at night, moonlight"
        );
        assert_eq!(
            kept_subject("same but blue", Some("a cat, at dusk")),
            "a cat"
        );
    }
}
