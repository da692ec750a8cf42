//! Chat templates: how a conversation is written as the one text the model continues, and which
//! tokens end the assistant's turn. The two families' own formats, as their `chat_template`s
//! (Jinja, in the GGUF's `tokenizer.chat_template`) write them for a system turn followed by user
//! and assistant turns, with the generation prompt appended.

use anyhow::{bail, Result};

use super::{Role, Turn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\n…<|im_end|>\n`: Qwen2/2.5, SmolLM2.
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>`: Llama 3, 3.1, 3.2.
    Llama3,
}

impl ChatTemplate {
    /// The template a model's own Jinja template (when its file has one) or its special tokens name.
    pub fn detect(jinja: Option<&str>, has_token: impl Fn(&str) -> bool) -> Result<ChatTemplate> {
        if let Some(jinja) = jinja {
            if jinja.contains("<|im_start|>") {
                return Ok(ChatTemplate::ChatMl);
            }
            if jinja.contains("<|start_header_id|>") {
                return Ok(ChatTemplate::Llama3);
            }
        }
        if has_token("<|im_start|>") && has_token("<|im_end|>") {
            return Ok(ChatTemplate::ChatMl);
        }
        if has_token("<|start_header_id|>") && has_token("<|eot_id|>") {
            return Ok(ChatTemplate::Llama3);
        }
        bail!(
            "the model's chat format is neither ChatML (Qwen, SmolLM) nor Llama 3's: \
             use an instruction-tuned GGUF of one of those families"
        )
    }

    /// The prompt for the assistant's next turn.
    pub fn render(self, turns: &[Turn]) -> String {
        let mut out = String::new();
        match self {
            ChatTemplate::ChatMl => {
                for turn in turns {
                    out.push_str("<|im_start|>");
                    out.push_str(turn.role.as_str());
                    out.push('\n');
                    out.push_str(&turn.content);
                    out.push_str("<|im_end|>\n");
                }
                out.push_str("<|im_start|>assistant\n");
            }
            ChatTemplate::Llama3 => {
                out.push_str("<|begin_of_text|>");
                for turn in turns {
                    out.push_str("<|start_header_id|>");
                    out.push_str(turn.role.as_str());
                    out.push_str("<|end_header_id|>\n\n");
                    out.push_str(turn.content.trim());
                    out.push_str("<|eot_id|>");
                }
                out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
        }
        out
    }

    /// Tokens that end the assistant's turn, besides the vocabulary's end-of-sequence token.
    pub fn stop_tokens(self) -> &'static [&'static str] {
        match self {
            ChatTemplate::ChatMl => &["<|im_end|>", "<|endoftext|>"],
            ChatTemplate::Llama3 => &["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"],
        }
    }

    /// Whether the turns have the shape every template expects: an optional system turn first, then
    /// user and assistant in turn, ending with the user.
    pub fn check(turns: &[Turn]) -> Result<()> {
        let rest = match turns.first() {
            Some(t) if t.role == Role::System => &turns[1..],
            _ => turns,
        };
        if rest.last().map(|t| t.role) != Some(Role::User) {
            bail!("a conversation must end with a user turn");
        }
        if rest.iter().any(|t| t.role == Role::System) {
            bail!("only the first turn may be a system turn");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_writes_turns_and_the_generation_prompt() {
        let turns = [
            Turn::new(Role::System, "Be brief."),
            Turn::new(Role::User, "Hi"),
        ];
        assert_eq!(
            ChatTemplate::ChatMl.render(&turns),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama3_writes_headers_and_end_of_turn_tokens() {
        let turns = [
            Turn::new(Role::System, "Be brief."),
            Turn::new(Role::User, "Hi"),
        ];
        assert_eq!(
            ChatTemplate::Llama3.render(&turns),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn the_template_is_read_from_the_jinja_or_the_special_tokens() {
        let none = |_: &str| false;
        assert_eq!(
            ChatTemplate::detect(Some("{{'<|im_start|>' + message['role']}}"), none).unwrap(),
            ChatTemplate::ChatMl
        );
        let llama = |t: &str| ["<|start_header_id|>", "<|eot_id|>"].contains(&t);
        assert_eq!(
            ChatTemplate::detect(None, llama).unwrap(),
            ChatTemplate::Llama3
        );
        assert!(ChatTemplate::detect(None, none).is_err());
    }
}
