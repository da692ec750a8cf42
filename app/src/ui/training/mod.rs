//! Training: the page that starts a run (a dataset dropped, judged and uploaded with its settings) and
//! the page that follows one.

mod dataset;
mod run;
mod start;

pub use run::TrainingRunPage;
pub use start::TrainPage;
