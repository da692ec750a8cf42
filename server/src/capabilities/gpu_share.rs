//! One GPU shared by FLUX's memory plan and the chat's language model (docs/chat.md, "On a GPU"). The
//! chat model loads on the GPU only into memory FLUX's plan does not count on; a plan chosen while the
//! chat model is there leaves it what its answers still allocate. So neither runs the other out of
//! memory in the middle of its work, whichever loads first.

use std::sync::Mutex;

use engine::chat::LmMemory;
use engine::device::DeviceChoice;
use engine::memory::{gib, MemoryPlan, HEADROOM};

/// What each side counts on beyond what it already holds.
#[derive(Debug, Default)]
pub struct GpuShare {
    state: Mutex<Shares>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Shares {
    /// What FLUX's loaded plan may still allocate beyond its resident weights: its steps' and decodes'
    /// activations, up to the plan's budget.
    flux_pending: u64,
    /// What the chat model on the GPU may still allocate as it answers (its cache and scores).
    chat_working: u64,
}

/// Where the chat model runs, and why when it is not where it was asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatPlacement {
    Gpu,
    /// `--chat-device auto`, and the GPU has no room for it beside FLUX's plan.
    Cpu(String),
}

impl GpuShare {
    fn shares(&self) -> Shares {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Shares)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The GPU memory FLUX's plan may use: `cap` (`--gpu-memory`, or the preset's), else the GPU's
    /// `free` memory, less what the chat model's answers may still allocate. `None`: no limit known.
    pub fn flux_budget(&self, cap: Option<u64>, free: Option<u64>) -> Option<u64> {
        let working = self.shares().chat_working;
        if working == 0 {
            return cap;
        }
        let budget = match (cap, free) {
            (Some(cap), Some(free)) => cap.min(free),
            (cap, free) => cap.or(free)?,
        };
        Some(budget.saturating_sub(working))
    }

    /// FLUX loaded under `plan`.
    pub fn flux_loaded(&self, plan: &MemoryPlan) {
        let pending = plan
            .usable()
            .map_or(0, |usable| usable.saturating_sub(plan.resident_bytes()));
        self.update(|s| s.flux_pending = pending);
    }

    /// FLUX's model left memory (replaced, or its load failed).
    pub fn flux_unloaded(&self) {
        self.update(|s| s.flux_pending = 0);
    }

    /// Where a chat model that needs `need` runs, with `free` bytes free on the GPU now: there when it
    /// fits beside what FLUX's plan may still allocate (the plan's headroom kept), else on the CPU when
    /// the setting is `auto`, else (`cuda`) an error that says what to change.
    pub fn chat_placement(
        &self,
        choice: DeviceChoice,
        need: LmMemory,
        free: u64,
    ) -> anyhow::Result<ChatPlacement> {
        let pending = self.shares().flux_pending;
        let available = (free.saturating_sub(pending) as f64 * (1.0 - HEADROOM)) as u64;
        if need.total() <= available {
            return Ok(ChatPlacement::Gpu);
        }
        let why = format!(
            "the chat model needs {} of GPU memory ({} of weights, {} for {} tokens of context) and {} is free beside FLUX's memory plan",
            gib(need.total()),
            gib(need.weights),
            gib(need.working),
            need.context,
            gib(available),
        );
        match choice {
            DeviceChoice::Cuda => anyhow::bail!(
                "{why}: use --chat-device cpu, a smaller chat model (--chat-model), or a lower --gpu-memory for FLUX"
            ),
            DeviceChoice::Auto | DeviceChoice::Cpu => Ok(ChatPlacement::Cpu(format!(
                "{why}: it runs on the CPU (--chat-device cpu says so at start; a lower --gpu-memory for FLUX leaves it room)"
            ))),
        }
    }

    /// The chat model loaded on the GPU: its weights are allocated, its answers' memory is still to come.
    pub fn chat_loaded_on_gpu(&self, need: LmMemory) {
        self.update(|s| s.chat_working = need.working);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn lm(weights: u64, working: u64) -> LmMemory {
        LmMemory {
            weights,
            working,
            context: 4096,
        }
    }

    #[test]
    fn without_a_chat_model_on_the_gpu_flux_keeps_its_budget() {
        let share = GpuShare::default();
        assert_eq!(share.flux_budget(None, Some(20 * GIB)), None);
        assert_eq!(
            share.flux_budget(Some(16 * GIB), Some(20 * GIB)),
            Some(16 * GIB)
        );
    }

    #[test]
    fn a_plan_made_after_the_chat_model_loaded_leaves_it_its_answers_memory() {
        let share = GpuShare::default();
        share.chat_loaded_on_gpu(lm(2 * GIB, 3 * GIB));
        // The weights are already out of the free memory; the answers' 3 GiB are kept from FLUX.
        assert_eq!(share.flux_budget(None, Some(20 * GIB)), Some(17 * GIB));
        assert_eq!(
            share.flux_budget(Some(12 * GIB), Some(20 * GIB)),
            Some(9 * GIB)
        );
        assert_eq!(
            share.flux_budget(Some(30 * GIB), Some(20 * GIB)),
            Some(17 * GIB)
        );
        // On the CPU (no free memory known) only a cap limits the plan.
        assert_eq!(share.flux_budget(None, None), None);
    }

    #[test]
    fn the_chat_model_takes_the_gpu_only_where_the_flux_plan_does_not_count_on_it() {
        let share = GpuShare::default();
        let need = lm(2 * GIB, 2 * GIB);
        // Nothing loaded: 10 GiB free holds 4 GiB.
        assert_eq!(
            share
                .chat_placement(DeviceChoice::Auto, need, 10 * GIB)
                .unwrap(),
            ChatPlacement::Gpu
        );
        // FLUX resident with 8 GiB of its budget still to allocate: 10 GiB free is not room.
        let plan = engine::memory::MemoryPlan::choose(
            &engine::memory::ModelMemory {
                parts: vec![(engine::memory::Part::Transformer, 1_000_000_000)],
                shape: engine::memory::ActivationShape {
                    hidden: 3072,
                    downscale: 8,
                    text_tokens: 512,
                    batch: 1,
                    image_sequences: 1,
                    vae_channels: None,
                    compute_bytes: 2,
                },
            },
            Some(12 * GIB),
            (1024, 1024),
            16,
            None,
        )
        .unwrap();
        share.flux_loaded(&plan);
        let pending = plan.usable().unwrap() - plan.resident_bytes();
        assert!(pending > 8 * GIB);
        match share
            .chat_placement(DeviceChoice::Auto, need, 10 * GIB)
            .unwrap()
        {
            ChatPlacement::Cpu(why) => {
                assert!(why.contains("beside FLUX's memory plan"), "{why}");
                assert!(why.contains("--gpu-memory"), "{why}");
            }
            ChatPlacement::Gpu => panic!("no room was left, yet the GPU was chosen"),
        }
        // Asked for the GPU outright: refused with what to change.
        let err = share
            .chat_placement(DeviceChoice::Cuda, need, 10 * GIB)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--chat-device cpu"), "{err}");
        // With more free memory it fits again; once FLUX is gone, the same 10 GiB suffices.
        assert_eq!(
            share
                .chat_placement(DeviceChoice::Auto, need, pending + 5 * GIB)
                .unwrap(),
            ChatPlacement::Gpu
        );
        share.flux_unloaded();
        assert_eq!(
            share
                .chat_placement(DeviceChoice::Cuda, need, 10 * GIB)
                .unwrap(),
            ChatPlacement::Gpu
        );
    }
}
