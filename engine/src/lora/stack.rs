//! The LoRAs of one generation, resolved and loaded in order with their scales: the one way the server
//! and the command line turn [`LoraSpec`]s into what the pipeline's `set_loras` takes.

use super::cache::LoraCache;
use super::file::LoraFile;
use super::source::{with_trigger_words, LoraSource, LoraSpec};
use crate::hub::ProgressFn;
use crate::presets::PresetLora;
use anyhow::Result;
use std::fmt;
use std::sync::Arc;

/// Loaded LoRAs, in the order they were asked for.
pub struct LoraStack {
    layers: Vec<(LoraSpec, Arc<LoraFile>)>,
}

/// The LoRA of a stack that could not be had: the context of [`LoraStack::load`]'s errors
/// (`error.downcast_ref::<FailedLora>()`), so that a caller can tell a hub's failure from a local
/// file's.
#[derive(Debug, Clone)]
pub struct FailedLora(pub LoraSpec);

impl fmt::Display for FailedLora {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LoRA {}", self.0.name)
    }
}

impl LoraStack {
    /// Each spec's file, downloaded first when it is a hub one not yet cached (reporting through
    /// `progress`), then loaded through `cache`. The first that cannot be had stops the load, its
    /// error in the context of a [`FailedLora`].
    pub fn load(cache: &LoraCache, specs: Vec<LoraSpec>, progress: ProgressFn) -> Result<Self> {
        let mut layers = Vec::with_capacity(specs.len());
        for spec in specs {
            match cache.get(&spec.source, progress.clone()) {
                Ok(file) => layers.push((spec, file)),
                Err(e) => return Err(e.context(FailedLora(spec))),
            }
        }
        Ok(Self { layers })
    }

    /// Each file with its scale, in order: what `FluxPipeline::set_loras` takes.
    pub fn scaled(&self) -> Vec<(&LoraFile, f64)> {
        self.layers.iter().map(|(s, f)| (&**f, s.scale)).collect()
    }

    /// Each spec with its loaded file, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&LoraSpec, &LoraFile)> {
        self.layers.iter().map(|(s, f)| (s, &**f))
    }
}

impl LoraSpec {
    /// A preset's own LoRA, its scale multiplied by `scale`.
    pub fn of_preset(lora: &PresetLora, scale: f64) -> Result<Self> {
        Ok(Self {
            name: lora.source.to_string(),
            source: LoraSource::hub(lora.source)?,
            scale: lora.scale * scale,
            trigger_words: lora.trigger_words.iter().map(|w| w.to_string()).collect(),
        })
    }
}

/// `prompt` with the trigger words of `specs` that it lacks in front (see [`with_trigger_words`]).
pub fn prompt_with_trigger_words(prompt: &str, specs: &[LoraSpec]) -> String {
    with_trigger_words(
        prompt,
        specs
            .iter()
            .flat_map(|s| s.trigger_words.iter().map(String::as_str)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn a_stack_names_the_lora_it_could_not_load() {
        let cache = LoraCache::new(&Device::Cpu, DType::F32);
        let missing = LoraSpec {
            name: "gone".into(),
            source: LoraSource::Local("no/such/file.safetensors".into()),
            scale: 0.5,
            trigger_words: Vec::new(),
        };
        let err = LoraStack::load(&cache, vec![missing.clone()], Arc::new(|_| {}))
            .err()
            .expect("a missing file cannot load");
        assert_eq!(err.downcast_ref::<FailedLora>().unwrap().0, missing);
        let text = format!("{err:#}");
        assert!(
            text.starts_with("LoRA gone: ") && text.contains("no/such/file.safetensors"),
            "{text}"
        );
        let empty = LoraStack::load(&cache, Vec::new(), Arc::new(|_| {})).unwrap();
        assert!(empty.scaled().is_empty());
    }

    #[test]
    fn a_presets_lora_keeps_its_trigger_words_and_scales_by_the_request() {
        let preset = crate::presets::find(crate::presets::FLUX_DEV).unwrap();
        let spec = LoraSpec::of_preset(preset.lora.as_ref().unwrap(), 0.5).unwrap();
        assert!(matches!(spec.source, LoraSource::Hub { .. }));
        assert_eq!(spec.scale, preset.lora.as_ref().unwrap().scale * 0.5);
        assert_eq!(
            prompt_with_trigger_words("a cat", &[spec]),
            "Super Realism, a cat"
        );
    }
}
