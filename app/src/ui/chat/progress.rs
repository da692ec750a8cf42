//! One generation's live state, as its stream reports it: what the socket drives and the view shows.

use crate::ui::api;
use crate::{EventBody, GenerateResponse, JobEvent, JobStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Connecting,
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl Phase {
    pub(super) fn is_over(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::Cancelled)
    }
}

/// One generation's live state, as its stream reports it.
#[derive(Debug, Clone)]
pub(super) struct GenState {
    pub(super) phase: Phase,
    pub(super) job_id: Option<String>,
    pub(super) step: u32,
    pub(super) total: u32,
    /// A data URL of the latest step's preview of each image, by the image's index.
    pub(super) previews: Vec<String>,
    pub(super) result: Option<GenerateResponse>,
    pub(super) error: Option<String>,
    pub(super) cancelling: bool,
    pub(super) copied: bool,
}

impl GenState {
    pub(super) fn new() -> GenState {
        GenState {
            phase: Phase::Connecting,
            job_id: None,
            step: 0,
            total: 0,
            previews: Vec::new(),
            result: None,
            error: None,
            cancelling: false,
            copied: false,
        }
    }

    pub(super) fn finish(&mut self, mut response: GenerateResponse) {
        // The PNGs stay downloadable under /images/; the thread keeps only their addresses.
        response.image = String::new();
        for image in &mut response.images {
            image.image = String::new();
        }
        self.job_id = Some(response.job_id.clone());
        self.result = Some(response);
    }

    pub(super) fn apply(&mut self, event: JobEvent) {
        // A request refused before it became a job has no id.
        if !event.job_id.is_empty() {
            self.job_id = Some(event.job_id);
        }
        match event.body {
            EventBody::Status { status } => {
                self.phase = match status {
                    JobStatus::Queued => Phase::Queued,
                    JobStatus::Completed => Phase::Done,
                    JobStatus::Cancelled => Phase::Cancelled,
                    JobStatus::Failed | JobStatus::Interrupted => Phase::Failed,
                    _ => Phase::Running,
                }
            }
            EventBody::Step {
                step,
                total,
                preview,
                image,
                ..
            } => {
                self.phase = Phase::Running;
                self.step = step;
                self.total = total;
                if let Some(png) = preview {
                    let index = image.unwrap_or(0) as usize;
                    if self.previews.len() <= index {
                        self.previews.resize(index + 1, String::new());
                    }
                    self.previews[index] = api::png_data_url(&png);
                }
            }
            EventBody::Result(response) => self.finish(*response),
            EventBody::Error { error } => {
                self.phase = Phase::Failed;
                self.error = Some(error.message);
            }
            EventBody::Log { .. } | EventBody::Sample { .. } => {}
        }
    }
}
