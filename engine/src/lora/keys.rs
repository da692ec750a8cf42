//! What each key of a LoRA file means: which trainer's layout it is in, which layer it names and
//! in which naming scheme, and whether it holds the down matrix, the up matrix or alpha. Only names
//! are read here; placing them on a model is `place.rs`'s job.

use serde::Serialize;

/// The file layouts in the wild, told apart by their keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// kohya-ss/sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`.
    Kohya,
    /// ComfyUI: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`.
    ComfyUi,
    /// diffusers/PEFT (ai-toolkit, SimpleTuner, Replicate, the studio's trainer):
    /// `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`.
    Diffusers,
    /// XLabs: `double_blocks.0.processor.qkv_lora1.down.weight`.
    XLabs,
    /// PEFT matrices on BFL names: `double_blocks.0.img_attn.qkv.lora_A.weight` (also with a
    /// `diffusion_model.` or `base_model.model.` prefix, as fal and ComfyUI write them).
    BflPeft,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Kohya => "kohya",
            Format::ComfyUi => "comfyui",
            Format::Diffusers => "diffusers",
            Format::XLabs => "xlabs",
            Format::BflPeft => "bfl",
        }
    }
}

/// The naming scheme of a layer name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `double_blocks.0.img_attn.qkv`
    Bfl,
    /// `double_blocks_0_img_attn_qkv` (kohya writes BFL names with every dot an underscore).
    BflFlat,
    /// `transformer_blocks.0.attn.to_q`
    Diffusers,
    /// `transformer_blocks_0_attn_to_q` (kohya's `lora_transformer_` files).
    DiffusersFlat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Down,
    Up,
    Alpha,
}

/// Which output rows of the named layer an XLabs adapter covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    All,
    /// The q, k and v rows at the start of a single block's `linear1` (XLabs' `qkv_lora`).
    LeadingQkv,
}

/// One key of a LoRA file, understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    /// A matrix or alpha of an adapter on one transformer layer.
    Transformer {
        /// The key without its role suffix: the keys of one adapter share it.
        module: String,
        layer: String,
        scheme: Scheme,
        rows: Rows,
        role: Role,
        format: Format,
    },
    /// A text-encoder (CLIP or T5) adapter: the studio adapts the transformer only.
    TextEncoder { module: String },
    /// A whole difference a trainer stored beside its adapters (LyCORIS and ComfyUI's `.diff`
    /// for a weight or a norm's scale, `.diff_b` for a bias), added to the named tensor.
    Difference {
        layer: String,
        scheme: Scheme,
        /// `.diff_b`: a difference of the layer's bias, not its weight.
        bias: bool,
    },
}

/// Text-encoder adapters: kohya's `lora_te_`, `lora_te1_` (CLIP), `lora_te2_`, `lora_te3_` (T5,
/// sd-scripts' networks/lora_flux.py), diffusers' components, ComfyUI's `text_encoders.clip_l.`
/// and `text_encoders.t5xxl.`.
fn is_text_encoder(key: &str) -> bool {
    if let Some(rest) = key.strip_prefix("lora_te") {
        return rest
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .starts_with('_');
    }
    ["text_encoder.", "text_encoder_2.", "text_encoders."]
        .iter()
        .any(|p| key.starts_with(p))
}

/// Prefixes in front of a layer name that say nothing about it.
const CONTAINER_PREFIXES: [&str; 4] = [
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
];

const BFL_TOP_LEVEL: [&str; 8] = [
    "double_blocks.",
    "single_blocks.",
    "img_in",
    "txt_in",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
];

/// Reads one key; `None` for a key no FLUX LoRA layout has (the caller names it in its error).
pub fn parse(key: &str) -> Option<Key> {
    if is_text_encoder(key) {
        return Some(Key::TextEncoder {
            module: module_stem(key)
                .or_else(|| difference_stem(key).map(|(m, _)| m))
                .unwrap_or(key)
                .to_string(),
        });
    }
    if let Some((module, bias)) = difference_stem(key) {
        let (layer, scheme) = if let Some(flat) = module.strip_prefix("lora_unet_") {
            (flat, Scheme::BflFlat)
        } else if let Some(flat) = module.strip_prefix("lora_transformer_") {
            (flat, Scheme::DiffusersFlat)
        } else {
            let layer = strip_containers(module);
            let bfl = BFL_TOP_LEVEL.iter().any(|p| layer.starts_with(p));
            (layer, if bfl { Scheme::Bfl } else { Scheme::Diffusers })
        };
        return Some(Key::Difference {
            layer: layer.to_string(),
            scheme,
            bias,
        });
    }
    if let Some(rest) = key.strip_prefix("lora_unet_") {
        return kohya(key, rest, Scheme::BflFlat);
    }
    if let Some(rest) = key.strip_prefix("lora_transformer_") {
        return kohya(key, rest, Scheme::DiffusersFlat);
    }
    if key.contains(".processor.") {
        return xlabs(key);
    }
    let (module, role, kohya_matrices) = split_role(key)?;
    let layer = strip_containers(module);
    let bfl = BFL_TOP_LEVEL.iter().any(|p| layer.starts_with(p));
    let format = match (bfl, kohya_matrices) {
        (true, true) => Format::ComfyUi,
        (true, false) => Format::BflPeft,
        (false, _) => Format::Diffusers,
    };
    Some(Key::Transformer {
        module: module.to_string(),
        layer: layer.to_string(),
        scheme: if bfl { Scheme::Bfl } else { Scheme::Diffusers },
        rows: Rows::All,
        role,
        format,
    })
}

/// `(module, role, whether the matrices are named lora_down/lora_up)`.
fn split_role(key: &str) -> Option<(&str, Role, bool)> {
    const SUFFIXES: [(&str, Role, bool); 7] = [
        (".lora_down.weight", Role::Down, true),
        (".lora_up.weight", Role::Up, true),
        (".lora_A.weight", Role::Down, false),
        (".lora_B.weight", Role::Up, false),
        // diffusers' older attention-processor naming.
        (".lora.down.weight", Role::Down, false),
        (".lora.up.weight", Role::Up, false),
        (".alpha", Role::Alpha, false),
    ];
    SUFFIXES
        .iter()
        .find_map(|(s, role, k)| key.strip_suffix(s).map(|m| (m, *role, *k)))
}

fn strip_containers(mut layer: &str) -> &str {
    while let Some(p) = CONTAINER_PREFIXES.iter().find(|p| layer.starts_with(*p)) {
        layer = &layer[p.len()..];
    }
    layer
}

/// `(the tensor's name, whether it is a bias)` of a `.diff` / `.diff_b` key. ComfyUI names the
/// tensor (`img_in.weight.diff`, `...key_norm.scale.diff`) or only the layer (`img_in.diff`).
fn difference_stem(key: &str) -> Option<(&str, bool)> {
    let (stem, bias) = if let Some(s) = key.strip_suffix(".diff_b") {
        (s, true)
    } else {
        (key.strip_suffix(".diff")?, false)
    };
    Some((stem.strip_suffix(".weight").unwrap_or(stem), bias))
}

fn module_stem(key: &str) -> Option<&str> {
    split_role(key).map(|(m, _, _)| m)
}

fn kohya(key: &str, flat: &str, scheme: Scheme) -> Option<Key> {
    let (name, role) = match flat.split_once('.')? {
        (n, "lora_down.weight") => (n, Role::Down),
        (n, "lora_up.weight") => (n, Role::Up),
        (n, "alpha") => (n, Role::Alpha),
        _ => return None,
    };
    Some(Key::Transformer {
        module: key[..key.len() - flat.len() + name.len()].to_string(),
        layer: name.to_string(),
        scheme,
        rows: Rows::All,
        role,
        format: Format::Kohya,
    })
}

/// XLabs attaches its adapters to attention processors: in a double block `qkv_lora1`/`proj_lora1`
/// adapt the image stream's `img_attn.qkv`/`img_attn.proj`, `..._lora2` the text stream's; in a
/// single block `qkv_lora` adapts the q, k, v rows of `linear1`. (A single block's `proj_lora`
/// is added to `linear2`'s *output*, which no linear-layer adapter can express: it stays unparsed
/// and so is reported as unplaceable.)
fn xlabs(key: &str) -> Option<Key> {
    let key_body = key.strip_prefix("diffusion_model.").unwrap_or(key);
    let (block, rest) = key_body.split_once(".processor.")?;
    let (adapter, role) = match rest.split_once('.')? {
        (a, "down.weight") => (a, Role::Down),
        (a, "up.weight") => (a, Role::Up),
        _ => return None,
    };
    let (layer, rows) = if block.starts_with("double_blocks.") {
        let sub = match adapter {
            "qkv_lora1" => "img_attn.qkv",
            "proj_lora1" => "img_attn.proj",
            "qkv_lora2" => "txt_attn.qkv",
            "proj_lora2" => "txt_attn.proj",
            _ => return None,
        };
        (format!("{block}.{sub}"), Rows::All)
    } else if block.starts_with("single_blocks.") && adapter == "qkv_lora" {
        (format!("{block}.linear1"), Rows::LeadingQkv)
    } else {
        return None;
    };
    Some(Key::Transformer {
        module: key[..key.len() - rest.len() + adapter.len()].to_string(),
        layer,
        scheme: Scheme::Bfl,
        rows,
        role,
        format: Format::XLabs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transformer(key: &str) -> (String, String, Scheme, Role, Format) {
        match parse(key) {
            Some(Key::Transformer {
                module,
                layer,
                scheme,
                role,
                format,
                ..
            }) => (module, layer, scheme, role, format),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn every_layout_is_recognised() {
        let k = transformer("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight");
        assert_eq!(k.0, "lora_unet_double_blocks_0_img_attn_qkv");
        assert_eq!(
            (k.1.as_str(), k.2, k.3, k.4),
            (
                "double_blocks_0_img_attn_qkv",
                Scheme::BflFlat,
                Role::Down,
                Format::Kohya
            )
        );
        let k = transformer("diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight");
        assert_eq!(
            (k.1.as_str(), k.3, k.4),
            ("double_blocks.0.img_attn.qkv", Role::Up, Format::ComfyUi)
        );
        let k = transformer("diffusion_model.double_blocks.0.img_attn.qkv.alpha");
        assert_eq!(
            (k.1.as_str(), k.3),
            ("double_blocks.0.img_attn.qkv", Role::Alpha)
        );
        let k = transformer("transformer.transformer_blocks.0.attn.to_q.lora_B.weight");
        assert_eq!(
            (k.1.as_str(), k.2, k.3, k.4),
            (
                "transformer_blocks.0.attn.to_q",
                Scheme::Diffusers,
                Role::Up,
                Format::Diffusers
            )
        );
        let k = transformer("single_transformer_blocks.3.proj_mlp.lora_A.weight");
        assert_eq!(
            (k.1.as_str(), k.4),
            ("single_transformer_blocks.3.proj_mlp", Format::Diffusers)
        );
        let k = transformer("base_model.model.final_layer.linear.lora_A.weight");
        assert_eq!(
            (k.1.as_str(), k.2, k.4),
            ("final_layer.linear", Scheme::Bfl, Format::BflPeft)
        );
        let k = transformer("double_blocks.1.processor.qkv_lora2.up.weight");
        assert_eq!(k.0, "double_blocks.1.processor.qkv_lora2");
        assert_eq!(
            (k.1.as_str(), k.3, k.4),
            ("double_blocks.1.txt_attn.qkv", Role::Up, Format::XLabs)
        );
        for te in [
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q.alpha",
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight",
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight",
        ] {
            assert!(matches!(parse(te), Some(Key::TextEncoder { .. })), "{te}");
        }
        assert_eq!(
            parse("diffusion_model.img_in.diff_b"),
            Some(Key::Difference {
                layer: "img_in".into(),
                scheme: Scheme::Bfl,
                bias: true
            })
        );
        assert_eq!(
            parse("lora_unet_double_blocks_0_img_attn_proj.diff"),
            Some(Key::Difference {
                layer: "double_blocks_0_img_attn_proj".into(),
                scheme: Scheme::BflFlat,
                bias: false
            })
        );
        assert_eq!(
            parse("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"),
            Some(Key::TextEncoder {
                module: "lora_te1_text_model_encoder_layers_0_mlp_fc1".into()
            })
        );
    }

    #[test]
    fn unknown_kinds_are_not_guessed() {
        assert_eq!(parse("transformer.x.dora_scale"), None);
        assert_eq!(
            parse("lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a"),
            None
        );
        assert_eq!(
            parse("single_blocks.0.processor.proj_lora.down.weight"),
            None
        );
    }
}
