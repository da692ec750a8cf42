//! Training the head with candle autograd on frozen sentence embeddings, and fitting its
//! temperature afterwards.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use engine::classifier::{Head, CONTEXT_FEATURES};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Width of the hidden layer; 0 trains a logistic regression on the embedding.
    pub hidden: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            hidden: 256,
            epochs: 40,
            batch_size: 32,
            learning_rate: 1e-3,
            weight_decay: 1e-2,
            seed: 7,
        }
    }
}

/// Mean binary cross-entropy from logits, written as max(z, 0) - z*y + ln(1 + e^-|z|) so that
/// large logits neither overflow nor take the log of zero.
pub(super) fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let loss = ((logits.relu()? - (logits * targets)?)? + softplus)?;
    Ok(loss.mean_all()?)
}

/// Weights drawn from our own seeded generator, so that a training run is reproducible
/// (candle's CPU random numbers cannot be seeded).
fn init(rows: usize, cols: usize, rng: &mut StdRng, device: &Device) -> Result<Var> {
    let normal = Normal::new(0f32, (1.0 / cols as f32).sqrt())?;
    let data: Vec<f32> = (0..rows * cols).map(|_| normal.sample(rng)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(
        data,
        (rows, cols),
        device,
    )?)?)
}

/// One epoch's report, for the training log.
#[derive(Debug, Clone, Copy)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f32,
    pub val_loss: f32,
    pub val_accuracy: f32,
}

/// Embeddings with their context features (`[n, d]` and `[n, CONTEXT_FEATURES]`) and 0/1 targets.
pub struct Rows<'a> {
    pub x: &'a Tensor,
    pub context: &'a Tensor,
    pub targets: &'a [f32],
}

/// Trains a head on embeddings and context features, keeping the weights of the epoch with the
/// lowest validation loss. Returns the head (temperature 1) and the per-epoch log.
pub fn train_head(train: Rows, val: Rows, cfg: &TrainConfig) -> Result<(Head, Vec<EpochReport>)> {
    let Rows {
        x,
        context,
        targets,
    } = train;
    let (n, d) = x.dims2()?;
    ensure!(n == targets.len() && n > 0, "one target per embedding");
    let device = x.device();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (vars, live) = new_head(d + CONTEXT_FEATURES, cfg.hidden, &mut rng, device)?;
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: cfg.learning_rate,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let y = Tensor::new(targets, device)?;
    let val_targets = val.targets;
    let val_y = Tensor::new(val_targets, device)?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut best: Option<(f32, Head)> = None;
    let mut log = Vec::with_capacity(cfg.epochs);
    for epoch in 1..=cfg.epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0f32;
        for batch in order.chunks(cfg.batch_size.max(1)) {
            let idx = Tensor::new(batch, device)?;
            let logits = live.logits(&x.index_select(&idx, 0)?, &context.index_select(&idx, 0)?)?;
            let loss = bce_with_logits(&logits, &y.index_select(&idx, 0)?)?;
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? * batch.len() as f32;
        }
        let val_logits = live.logits(val.x, val.context)?;
        let val_loss = bce_with_logits(&val_logits, &val_y)?.to_scalar::<f32>()?;
        let correct = val_logits
            .to_vec1::<f32>()?
            .iter()
            .zip(val_targets)
            .filter(|(z, t)| (**z > 0.0) == (**t > 0.5))
            .count();
        log.push(EpochReport {
            epoch,
            train_loss: loss_sum / n as f32,
            val_loss,
            val_accuracy: correct as f32 / val_targets.len().max(1) as f32,
        });
        if best.as_ref().is_none_or(|(l, _)| val_loss < *l) {
            best = Some((val_loss, snapshot(&live)?));
        }
    }
    let (_, head) = best.expect("at least one epoch");
    Ok((head, log))
}

/// A freshly initialised head: its trainable Vars, and a Head whose tensors share their storage,
/// so that it always computes with the current weights and gradients flow through it.
pub(super) fn new_head(
    input: usize,
    hidden: usize,
    rng: &mut StdRng,
    device: &Device,
) -> Result<(Vec<Var>, Head)> {
    let hidden = (hidden > 0)
        .then(|| -> Result<(Var, Var)> {
            Ok((
                init(hidden, input, rng, device)?,
                Var::zeros(hidden, DType::F32, device)?,
            ))
        })
        .transpose()?;
    let out_in = hidden.as_ref().map_or(input, |(w, _)| w.dims()[0]);
    let out = (
        init(1, out_in, rng, device)?,
        Var::zeros(1, DType::F32, device)?,
    );
    let head = Head {
        top: Default::default(),
        hidden: hidden
            .as_ref()
            .map(|(w, b)| (w.as_tensor().clone(), b.as_tensor().clone())),
        out: (out.0.as_tensor().clone(), out.1.as_tensor().clone()),
        temperature: 1.0,
    };
    let mut vars = vec![out.0, out.1];
    if let Some((w, b)) = hidden {
        vars.extend([w, b]);
    }
    Ok((vars, head))
}

/// Copies the live weights out of the Vars' shared storage.
pub(super) fn snapshot(head: &Head) -> Result<Head> {
    Ok(Head {
        top: head
            .top
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.copy()?.detach())))
            .collect::<Result<_>>()?,
        hidden: head
            .hidden
            .as_ref()
            .map(|(w, b)| -> Result<_> { Ok((w.copy()?.detach(), b.copy()?.detach())) })
            .transpose()?,
        out: (head.out.0.copy()?.detach(), head.out.1.copy()?.detach()),
        temperature: head.temperature,
    })
}

/// The temperature that minimises the negative log-likelihood of held-out logits. A grid in log
/// space is enough for one parameter, and unlike gradient steps it cannot diverge.
pub fn fit_temperature(logits: &[f32], targets: &[f32]) -> f32 {
    let nll = |t: f32| -> f64 {
        logits
            .iter()
            .zip(targets)
            .map(|(&z, &y)| {
                let z = f64::from(z / t);
                // -log sigmoid(z) for y = 1, -log(1 - sigmoid(z)) for y = 0, both stable.
                let signed = if y > 0.5 { z } else { -z };
                (-signed).max(0.0) + (-signed.abs()).exp().ln_1p()
            })
            .sum()
    };
    (0..=400)
        .map(|i| 10f32.powf(-1.0 + i as f32 * 2.0 / 400.0)) // 0.1 ..= 10
        .min_by(|a, b| nll(*a).total_cmp(&nll(*b)))
        .expect("non-empty grid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bce_matches_the_textbook_formula() -> Result<()> {
        let z = Tensor::new(&[2.0f32, -1.0, 0.0], &Device::Cpu)?;
        let y = Tensor::new(&[1.0f32, 1.0, 0.0], &Device::Cpu)?;
        let got = bce_with_logits(&z, &y)?.to_scalar::<f32>()?;
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let want = -((sig(2.0)).ln() + (sig(-1.0)).ln() + (1.0 - sig(0.0)).ln()) / 3.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn temperature_softens_overconfident_logits() {
        // Logits of +-4 (p = 0.98) on data that is right only 80% of the time.
        let mut logits = vec![4.0f32; 10];
        logits.extend([-4.0f32; 10]);
        let mut targets = vec![1.0f32; 8];
        targets.extend([0.0; 2]);
        targets.extend([0.0; 8]);
        targets.extend([1.0; 2]);
        let t = fit_temperature(&logits, &targets);
        // sigmoid(4 / t) = 0.8 at t = 4 / ln 4.
        assert!((t - 4.0 / 4f32.ln()).abs() < 0.05, "t = {t}");
    }

    #[test]
    fn learns_a_separable_problem() -> Result<()> {
        let x = Tensor::new(
            &[[1f32, 0.], [0.9, 0.1], [0., 1.], [0.1, 0.9]],
            &Device::Cpu,
        )?;
        let y = [1f32, 1., 0., 0.];
        let cfg = TrainConfig {
            hidden: 4,
            epochs: 200,
            batch_size: 4,
            learning_rate: 0.05,
            ..Default::default()
        };
        let context = Tensor::zeros((4, CONTEXT_FEATURES), DType::F32, &Device::Cpu)?;
        let rows = || Rows {
            x: &x,
            context: &context,
            targets: &y,
        };
        let (head, log) = train_head(rows(), rows(), &cfg)?;
        assert!(log.last().unwrap().val_accuracy == 1.0);
        let p = head.image_probabilities(&x, &context)?;
        assert!(p[0] > 0.9 && p[2] < 0.1, "{p:?}");
        Ok(())
    }
}
