//! The engine's chat models behind the server's `Chat` seam: a local GGUF model (loaded on first use,
//! fetched from the hub first when a hub preset names it) or an OpenAI-compatible server.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use engine::chat::docs::{DocChunk, DocIndex};
use engine::chat::{Answer, GgufChat, LanguageModel, OpenAiChat, SamplingSettings, Turn};
use engine::classifier::{EncoderSource, SentenceEncoder};
use engine::device::DeviceChoice;
use engine::hub::Hub;

use crate::capabilities::gpu_share::{ChatPlacement, GpuShare};
use crate::config::ChatConfig;
use crate::jobs::capability::{Chat, Control};

/// Where the model comes from, checked at start.
enum Backend {
    /// A GGUF already on disk.
    File(PathBuf),
    /// A hub preset or file, fetched at the first answer.
    Hub,
    Server,
}

pub struct EngineChat {
    setting: String,
    device: DeviceChoice,
    backend: Backend,
    /// The model, once loaded; the lock also makes answers take turns.
    model: Mutex<Option<Box<dyn LanguageModel>>>,
    /// `None` with `--chat-docs false`.
    docs: Option<Arc<StudioDocs>>,
    /// The GPU it may share with a worker's FLUX (`gpu_share`); none: it counts only on itself.
    gpu_share: Option<Arc<GpuShare>>,
}

/// The studio's bundled docs, embedded once, on a thread of their own from the start so that the first
/// question does not wait for it (a question asked before it is done waits for it).
struct StudioDocs {
    encoder: EncoderSource,
    index: OnceLock<Result<(SentenceEncoder, DocIndex), String>>,
}

impl StudioDocs {
    /// The docs the settings ask for: none with `--chat-docs false`.
    fn for_settings(config: &ChatConfig) -> Result<Option<Arc<StudioDocs>>> {
        config
            .chat_docs
            .then(|| StudioDocs::new(&config.chat_docs_encoder))
            .transpose()
    }

    /// Checks that the encoder is there (a missing one is reported by `/health` at once).
    fn new(setting: &str) -> Result<Arc<StudioDocs>> {
        let encoder = EncoderSource::parse(setting)
            .context("--chat-docs-encoder: the encoder of the studio's docs")?;
        if let EncoderSource::Dir(dir) = &encoder {
            anyhow::ensure!(
                dir.join("config.json").is_file(),
                "the encoder that searches the studio's docs is missing at {} (--chat-docs-encoder): run \
                 scripts/fetch-models",
                dir.display()
            );
        }
        let docs = Arc::new(StudioDocs {
            encoder,
            index: OnceLock::new(),
        });
        let warm = docs.clone();
        std::thread::spawn(move || {
            if let Err(e) = warm.index() {
                // Each question reports it too, as its answer's error.
                tracing::warn!("{e:#}");
            }
        });
        Ok(docs)
    }

    fn index(&self) -> Result<&(SentenceEncoder, DocIndex)> {
        self.index
            .get_or_init(|| {
                let build = || -> Result<_> {
                    // On the CPU: it is small, and GPU memory is left to FLUX.
                    let encoder = SentenceEncoder::load(&self.encoder, &candle_core::Device::Cpu)?;
                    let index = DocIndex::build(&encoder, crate::studio_docs::STUDIO_DOCS)?;
                    tracing::info!("the studio's docs are indexed: {} sections", index.len());
                    Ok((encoder, index))
                };
                build().map_err(|e| format!("indexing the studio's docs: {e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// The chat the settings name. A local model's file is checked here, so that a missing default model is
/// reported by `/health` at once; the model itself loads at the first answer.
pub fn load(config: &ChatConfig) -> Result<EngineChat> {
    if let Some(url) = &config.chat_server {
        let model = config.chat_server_model.clone().context(
            "--chat-server needs --chat-server-model: the model name to ask that server for",
        )?;
        let key = config
            .chat_server_key
            .as_ref()
            .map(|k| k.expose().to_owned());
        let chat: Box<dyn LanguageModel> = Box::new(OpenAiChat::new(url, &model, key));
        return Ok(EngineChat {
            setting: model,
            device: config.chat_device,
            backend: Backend::Server,
            model: Mutex::new(Some(chat)),
            docs: StudioDocs::for_settings(config)?,
            gpu_share: None,
        });
    }
    let setting = config.chat_model.clone();
    let offline = Hub {
        offline: true,
        ..Hub::from_env()
    };
    // Resolving against an offline hub never downloads: a file on disk (or in the cache) is found, a
    // missing installed preset is an error, and a hub file not yet cached waits for the first answer.
    let backend = match engine::chat::presets::resolve(&setting, &offline, Arc::new(|_| {})) {
        Ok(path) => Backend::File(path),
        Err(err) => {
            let installed = engine::chat::presets::preset(&setting)
                .is_some_and(|p| matches!(p.source, engine::chat::LmSource::Installed(_)));
            let on_hub = setting.contains(':')
                || engine::chat::presets::preset(&setting)
                    .is_some_and(|p| matches!(p.source, engine::chat::LmSource::Hub { .. }));
            if installed || !on_hub {
                return Err(err);
            }
            Backend::Hub
        }
    };
    Ok(EngineChat {
        setting,
        device: config.chat_device,
        backend,
        model: Mutex::new(None),
        docs: StudioDocs::for_settings(config)?,
        gpu_share: None,
    })
}

impl EngineChat {
    /// Shares the GPU with the worker's FLUX there: the model loads on it only into memory FLUX's plan
    /// does not count on.
    pub fn with_gpu_share(mut self, share: Arc<GpuShare>) -> Self {
        self.gpu_share = Some(share);
        self
    }

    fn load_model(&self) -> Result<Box<dyn LanguageModel>> {
        let path = match &self.backend {
            Backend::File(path) => path.clone(),
            Backend::Hub => engine::chat::presets::resolve(
                &self.setting,
                &Hub::from_env(),
                Arc::new(|p| {
                    tracing::debug!(
                        "chat model download: {} {}/{}",
                        p.file,
                        p.file_bytes,
                        p.file_total
                    )
                }),
            )?,
            Backend::Server => unreachable!("a server backend is made at start"),
        };
        let mut device = self.device.select()?;
        let mut on_gpu = None;
        if device.is_cuda() {
            let need = engine::chat::LmMemory::of_file(&path)?;
            let free = engine::device::free_memory(&device)?.unwrap_or(0);
            let share = self.gpu_share.clone().unwrap_or_default();
            match share.chat_placement(self.device, need, free)? {
                ChatPlacement::Gpu => on_gpu = Some((share, need)),
                ChatPlacement::Cpu(why) => {
                    tracing::warn!("{why}");
                    device = candle_core::Device::Cpu;
                }
            }
        }
        tracing::info!(
            "loading the chat model {} from {} onto {}",
            self.setting,
            path.display(),
            engine::device::device_name(&device)
        );
        let model = GgufChat::load(&path, &self.setting, &device)
            .with_context(|| format!("loading the chat model {}", self.setting))?;
        if let Some((share, need)) = on_gpu {
            share.chat_loaded_on_gpu(need);
        }
        Ok(Box::new(model))
    }
}

impl Chat for EngineChat {
    fn model(&self) -> String {
        self.setting.clone()
    }

    fn answer(
        &self,
        turns: &[Turn],
        settings: &SamplingSettings,
        on_text: &mut dyn FnMut(&str) -> Control,
    ) -> Result<Answer> {
        let mut slot = self
            .model
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_none() {
            *slot = Some(self.load_model()?);
        }
        let model = slot.as_mut().expect("loaded above");
        model.answer(turns, settings, &mut |piece| match on_text(piece) {
            Control::Continue => ControlFlow::Continue(()),
            Control::Cancel => ControlFlow::Break(()),
        })
    }

    fn studio_docs(&self, question: &str, k: usize) -> Result<Vec<(f32, DocChunk)>> {
        let Some(docs) = &self.docs else {
            return Ok(Vec::new());
        };
        let (encoder, index) = docs.index()?;
        Ok(index
            .search(encoder, question, k)?
            .into_iter()
            .map(|(score, chunk)| (score, chunk.clone()))
            .collect())
    }
}
