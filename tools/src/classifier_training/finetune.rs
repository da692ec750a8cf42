//! Fine-tuning the encoder's last layers together with the head. The bottom layers stay frozen,
//! so their output is computed once and reused every epoch: on a CPU that is what makes
//! training a few layers affordable.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use app::TurnKind;
use engine::classifier::{
    context_tensor, length_order, pool, EncoderSource, Head, SentenceEncoder, CONTEXT_FEATURES,
};

use super::top::TopLayers;
use super::train::{bce_with_logits, new_head, snapshot, EpochReport};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TuneConfig {
    /// How many of the encoder's last layers to train.
    pub layers: usize,
    pub hidden: usize,
    pub epochs: usize,
    pub batch_size: usize,
    /// Pretrained layers need far smaller steps than the freshly initialised head.
    pub encoder_learning_rate: f64,
    pub head_learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

/// Prompts with their conversations' last answers and 0/1 targets.
#[derive(Clone, Copy)]
pub struct Texts<'a> {
    pub texts: &'a [&'a str],
    pub last_answers: &'a [Option<TurnKind>],
    pub targets: &'a [f32],
}

/// Bottom-layer outputs of one batch, kept for all epochs.
struct Batch {
    hidden: Tensor,
    mask: Tensor,
    context: Tensor,
    targets: Tensor,
}

fn cache(encoder: &SentenceEncoder, rows: Texts, size: usize) -> Result<Vec<Batch>> {
    length_order(rows.texts)
        .chunks(size.max(1))
        .map(|chunk| {
            let batch_texts: Vec<&str> = chunk.iter().map(|&i| rows.texts[i]).collect();
            let batch_answers: Vec<_> = chunk.iter().map(|&i| rows.last_answers[i]).collect();
            let batch_targets: Vec<f32> = chunk.iter().map(|&i| rows.targets[i]).collect();
            let (hidden, mask) = encoder.bottom_states(&batch_texts)?;
            Ok(Batch {
                hidden,
                mask,
                context: context_tensor(&batch_answers, encoder.device())?,
                targets: Tensor::new(batch_targets.as_slice(), encoder.device())?,
            })
        })
        .collect()
}

/// Trains the last `cfg.layers` layers and a new head on `train`; keeps the epoch with the
/// lowest validation loss. The returned head carries the tuned layers in `top`.
pub fn finetune(
    source: &EncoderSource,
    train: Texts,
    val: Texts,
    cfg: &TuneConfig,
) -> Result<(Head, Vec<EpochReport>)> {
    ensure!(cfg.layers > 0, "fine-tuning needs at least one layer");
    for rows in [&train, &val] {
        ensure!(
            rows.texts.len() == rows.targets.len() && rows.texts.len() == rows.last_answers.len(),
            "one target and one last answer per text"
        );
    }
    ensure!(!train.texts.is_empty(), "nothing to train on");
    let device = candle_core::Device::Cpu;
    let pretrained = SentenceEncoder::pretrained_top(source, &device, cfg.layers)?;
    let frozen = SentenceEncoder::load_with_top(source, &device, pretrained.clone())?;
    let train_batches = cache(&frozen, train, cfg.batch_size)?;
    let val_batches = cache(&frozen, val, 64)?;

    // Tensors that share storage with Vars: the layers built on them train in place.
    let top_vars: HashMap<String, Var> = pretrained
        .iter()
        .map(|(k, t)| Ok((k.clone(), Var::from_tensor(t)?)))
        .collect::<Result<_>>()?;
    let top_tensors: HashMap<String, Tensor> = top_vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let top = TopLayers::new(top_tensors.clone(), cfg.layers, frozen.config())?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (head_vars, mut live) = new_head(
        frozen.hidden_size() + CONTEXT_FEATURES,
        cfg.hidden,
        &mut rng,
        &device,
    )?;
    live.top = top_tensors;
    // Vars are sorted by name so that the optimiser's state, and so the run, is reproducible.
    let mut names: Vec<&String> = top_vars.keys().collect();
    names.sort();
    let mut encoder_opt = AdamW::new(
        names.iter().map(|n| top_vars[*n].clone()).collect(),
        ParamsAdamW {
            lr: cfg.encoder_learning_rate,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let mut head_opt = AdamW::new(
        head_vars,
        ParamsAdamW {
            lr: cfg.head_learning_rate,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let logits = |b: &Batch| -> Result<Tensor> {
        live.logits(
            &pool(&top.forward(&b.hidden, &b.mask)?, &b.mask)?,
            &b.context,
        )
    };

    let mut order: Vec<usize> = (0..train_batches.len()).collect();
    let mut best: Option<(f32, Head)> = None;
    let mut log = Vec::with_capacity(cfg.epochs);
    for epoch in 1..=cfg.epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0f32;
        for &i in &order {
            let b = &train_batches[i];
            let loss = bce_with_logits(&logits(b)?, &b.targets)?;
            let grads = loss.backward()?;
            encoder_opt.step(&grads)?;
            head_opt.step(&grads)?;
            loss_sum += loss.to_scalar::<f32>()? * b.targets.dim(0)? as f32;
        }
        let (mut val_loss, mut correct) = (0f32, 0usize);
        for b in &val_batches {
            let z = logits(b)?.detach();
            val_loss += bce_with_logits(&z, &b.targets)?.to_scalar::<f32>()? * z.dim(0)? as f32;
            let t = b.targets.to_vec1::<f32>()?;
            correct += z
                .to_vec1::<f32>()?
                .iter()
                .zip(&t)
                .filter(|(z, t)| (**z > 0.0) == (**t > 0.5))
                .count();
        }
        let n_val = val.targets.len().max(1) as f32;
        log.push(EpochReport {
            epoch,
            train_loss: loss_sum / train.texts.len() as f32,
            val_loss: val_loss / n_val,
            val_accuracy: correct as f32 / n_val,
        });
        if best.as_ref().is_none_or(|(l, _)| val_loss / n_val < *l) {
            best = Some((val_loss / n_val, snapshot(&live)?));
        }
    }
    let (_, head) = best.expect("at least one epoch");
    Ok((head, log))
}
