//! The two checkpoint layouts of the FLUX transformer. The model is written with BFL's names
//! (`double_blocks.N.img_attn.qkv`); diffusers splits some of those layers (`to_q`, `to_k`,
//! `to_v`) and swaps the halves of the final modulation. This table is the single place that
//! knows how the two correspond: weight loading and LoRA key mapping both read it.

use std::collections::HashMap;

/// How one BFL layer is stored in diffusers' layout.
#[derive(Debug, Clone, PartialEq)]
pub enum DiffusersParts {
    /// The same layer under another name.
    Same(String),
    /// Several diffusers layers whose outputs are stacked, in order, into the BFL layer.
    Stacked(Vec<String>),
    /// The same layer with its two output halves in the other order (diffusers' AdaLayerNormContinuous
    /// produces (scale, shift); BFL's final layer (shift, scale)).
    SwappedHalves(String),
}

/// Maps a BFL layer name (no `.weight` suffix) to its diffusers counterpart.
pub fn diffusers_parts(bfl: &str) -> Option<DiffusersParts> {
    use DiffusersParts::*;
    let same = |s: &str| Some(Same(s.to_string()));
    match bfl {
        "img_in" => return same("x_embedder"),
        "txt_in" => return same("context_embedder"),
        "time_in.in_layer" => return same("time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer" => return same("time_text_embed.timestep_embedder.linear_2"),
        "vector_in.in_layer" => return same("time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer" => return same("time_text_embed.text_embedder.linear_2"),
        "guidance_in.in_layer" => return same("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in.out_layer" => return same("time_text_embed.guidance_embedder.linear_2"),
        "final_layer.linear" => return same("proj_out"),
        "final_layer.adaLN_modulation.1" => return Some(SwappedHalves("norm_out.linear".into())),
        _ => {}
    }
    if let Some(rest) = bfl.strip_prefix("double_blocks.") {
        let (i, layer) = rest.split_once('.')?;
        let p = format!("transformer_blocks.{i}");
        let stacked =
            |names: &[&str]| Some(Stacked(names.iter().map(|n| format!("{p}.{n}")).collect()));
        let same = |n: &str| Some(Same(format!("{p}.{n}")));
        return match layer {
            "img_mod.lin" => same("norm1.linear"),
            "txt_mod.lin" => same("norm1_context.linear"),
            "img_attn.qkv" => stacked(&["attn.to_q", "attn.to_k", "attn.to_v"]),
            "txt_attn.qkv" => stacked(&["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
            "img_attn.proj" => same("attn.to_out.0"),
            "txt_attn.proj" => same("attn.to_add_out"),
            "img_attn.norm.query_norm" => same("attn.norm_q"),
            "img_attn.norm.key_norm" => same("attn.norm_k"),
            "txt_attn.norm.query_norm" => same("attn.norm_added_q"),
            "txt_attn.norm.key_norm" => same("attn.norm_added_k"),
            "img_mlp.0" => same("ff.net.0.proj"),
            "img_mlp.2" => same("ff.net.2"),
            "txt_mlp.0" => same("ff_context.net.0.proj"),
            "txt_mlp.2" => same("ff_context.net.2"),
            _ => None,
        };
    }
    if let Some(rest) = bfl.strip_prefix("single_blocks.") {
        let (i, layer) = rest.split_once('.')?;
        let p = format!("single_transformer_blocks.{i}");
        return match layer {
            "linear1" => Some(Stacked(
                ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                    .iter()
                    .map(|n| format!("{p}.{n}"))
                    .collect(),
            )),
            "linear2" => Some(Same(format!("{p}.proj_out"))),
            "modulation.lin" => Some(Same(format!("{p}.norm.linear"))),
            "norm.query_norm" => Some(Same(format!("{p}.attn.norm_q"))),
            "norm.key_norm" => Some(Same(format!("{p}.attn.norm_k"))),
            _ => None,
        };
    }
    None
}

/// Where a diffusers layer's output rows lie inside a BFL layer: the inverse of [`diffusers_parts`].
#[derive(Debug, Clone, PartialEq)]
pub struct BflSlot {
    /// The BFL layer.
    pub layer: String,
    /// Which part of a [`DiffusersParts::Stacked`] layer (0 for the others).
    pub part: usize,
    /// Whether this is the last part of the stack (the only one that may be wider than the others).
    pub last: bool,
    /// The diffusers layer has the BFL layer's two output halves in the other order.
    pub swapped_halves: bool,
}

/// Every diffusers layer name that maps onto one of `bfl_layers`, with where it lands.
pub fn diffusers_slots<'a>(
    bfl_layers: impl IntoIterator<Item = &'a str>,
) -> HashMap<String, BflSlot> {
    let mut out = HashMap::new();
    for bfl in bfl_layers {
        let slot = |part, last, swapped_halves| BflSlot {
            layer: bfl.to_string(),
            part,
            last,
            swapped_halves,
        };
        match diffusers_parts(bfl) {
            Some(DiffusersParts::Same(d)) => {
                out.insert(d, slot(0, true, false));
            }
            Some(DiffusersParts::SwappedHalves(d)) => {
                out.insert(d, slot(0, true, true));
            }
            Some(DiffusersParts::Stacked(parts)) => {
                let n = parts.len();
                for (i, d) in parts.into_iter().enumerate() {
                    out.insert(d, slot(i, i + 1 == n, false));
                }
            }
            None => {}
        }
    }
    out
}

/// The first output row of part `part` of a stacked layer. Every part but the last (q, k, v) is
/// as wide as the layer's input, the hidden size; the last (q, k, v's `v`, or the single blocks'
/// MLP input) takes the rest.
pub fn stacked_part_offset(part: usize, in_features: usize) -> usize {
    part * in_features
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_layers_stack_in_bfl_order() {
        assert_eq!(
            diffusers_parts("single_blocks.7.linear1"),
            Some(DiffusersParts::Stacked(vec![
                "single_transformer_blocks.7.attn.to_q".into(),
                "single_transformer_blocks.7.attn.to_k".into(),
                "single_transformer_blocks.7.attn.to_v".into(),
                "single_transformer_blocks.7.proj_mlp".into(),
            ]))
        );
        assert_eq!(diffusers_parts("double_blocks.0.nonexistent"), None);
    }

    #[test]
    fn slots_invert_the_table() {
        let slots = diffusers_slots(["single_blocks.1.linear1", "final_layer.adaLN_modulation.1"]);
        let mlp = &slots["single_transformer_blocks.1.proj_mlp"];
        assert_eq!(
            (mlp.layer.as_str(), mlp.part, mlp.last),
            ("single_blocks.1.linear1", 3, true)
        );
        let k = &slots["single_transformer_blocks.1.attn.to_k"];
        assert_eq!((k.part, k.last), (1, false));
        assert!(slots["norm_out.linear"].swapped_halves);
        assert_eq!(slots.len(), 5);
    }
}
