//! Training the prompt classifier (`engine::classifier`) for `train-classifier`: the head on frozen
//! embeddings, or the encoder's last layers with it, and the temperature that calibrates it. The
//! engine only loads and runs what this writes.

mod finetune;
mod top;
mod train;

pub use finetune::{finetune, Texts, TuneConfig};
pub use top::TopLayers;
pub use train::{fit_temperature, train_head, EpochReport, Rows, TrainConfig};
