//! Putting the modules of LoRA files onto the transformer's layers: each becomes an [`Adapter`]
//! on the BFL layer it names, on the rows its diffusers name stands for (the layer merges its
//! adapters into its weight at the next forward).

use super::file::{LoraFile, Module};
use super::keys::{Rows, Scheme};
use crate::models::flux::layout::{diffusers_slots, stacked_part_offset};
use crate::models::flux::FluxTransformer;
use crate::models::linear::{Adapter, Linear};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// Where a name lands: a layer (index into `linears()`), which part of a stacked layer, whether
/// its output halves are swapped.
#[derive(Debug, Clone, Copy)]
struct Slot {
    linear: usize,
    part: Option<(usize, bool)>,
    swapped_halves: bool,
}

fn slots(linears: &[&Linear]) -> HashMap<(Scheme, String), Slot> {
    let index: HashMap<&str, usize> = linears
        .iter()
        .enumerate()
        .map(|(i, l)| (l.name(), i))
        .collect();
    let mut out = HashMap::new();
    for (name, &i) in &index {
        let whole = Slot {
            linear: i,
            part: None,
            swapped_halves: false,
        };
        out.insert((Scheme::Bfl, name.to_string()), whole);
        out.insert((Scheme::BflFlat, name.replace('.', "_")), whole);
    }
    for (diffusers, s) in diffusers_slots(index.keys().copied()) {
        let stacked = !s.last || s.part > 0;
        let slot = Slot {
            linear: index[s.layer.as_str()],
            part: stacked.then_some((s.part, s.last)),
            swapped_halves: s.swapped_halves,
        };
        out.insert((Scheme::DiffusersFlat, diffusers.replace('.', "_")), slot);
        out.insert((Scheme::Diffusers, diffusers), slot);
    }
    out
}

/// Sets exactly these LoRAs, each with its own multiplier, on the transformer's layers, replacing
/// whatever adapters were there (an empty list clears them all). Nothing changes on error.
pub fn apply(model: &FluxTransformer, loras: &[(&LoraFile, f64)]) -> Result<()> {
    let linears = model.linears();
    let slots = slots(&linears);
    let mut per_layer: Vec<Vec<Arc<Adapter>>> = vec![Vec::new(); linears.len()];
    for (n, (file, scale)) in loras.iter().enumerate() {
        for m in &file.modules {
            let (i, adapter) = place(m, &slots, &linears, *scale)
                .with_context(|| format!("LoRA {} of {}", n + 1, loras.len()))?;
            per_layer[i].push(Arc::new(adapter));
        }
    }
    for (linear, adapters) in linears.iter().zip(per_layer) {
        linear.set_adapters(adapters);
    }
    Ok(())
}

fn place(
    m: &Module,
    slots: &HashMap<(Scheme, String), Slot>,
    linears: &[&Linear],
    scale: f64,
) -> Result<(usize, Adapter)> {
    let Some(slot) = slots.get(&(m.scheme.clone(), m.layer.clone())) else {
        bail!(
            "cannot place the LoRA key `{}`: this model has no layer `{}` (a LoRA for another model, or for a FLUX with more blocks?)",
            m.key,
            m.layer
        );
    };
    let linear = linears[slot.linear];
    let (in_f, out_f) = (linear.in_features(), linear.out_features());
    let (_, down_in) = m.down.dims2()?;
    let (rows, _) = m.up.dims2()?;
    if down_in != in_f {
        bail!(
            "the LoRA key `{}` expects {} inputs but layer `{}` has {in_f} (a LoRA for another model?)",
            m.key,
            down_in,
            linear.name()
        );
    }
    let (offset, want_rows) = match (m.rows, slot.part) {
        (Rows::LeadingQkv, _) => (0, 3 * in_f),
        (Rows::All, None) => (0, out_f),
        (Rows::All, Some((part, last))) => {
            let offset = stacked_part_offset(part, in_f);
            (offset, if last { out_f - offset } else { in_f })
        }
    };
    if rows != want_rows {
        bail!(
            "the LoRA key `{}` has {rows} output rows where layer `{}` needs {want_rows} (a LoRA for another model?)",
            m.key,
            linear.name()
        );
    }
    let up = if slot.swapped_halves {
        let half = rows / 2;
        Tensor::cat(
            &[m.up.narrow(0, half, rows - half)?, m.up.narrow(0, 0, half)?],
            0,
        )?
    } else {
        m.up.clone()
    };
    Ok((
        slot.linear,
        Adapter {
            down: m.down.clone(),
            up,
            scale: scale * m.scale,
            out_offset: offset,
        },
    ))
}
