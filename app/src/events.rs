use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{ErrorDetail, GenerateResponse, JobStatus};

/// Every message both WebSockets send, and what the job's log keeps. A request refused before it became
/// a job, or a failure of the stream itself, is one of these too: an `error` with `seq` 0 ([`JobEvent::unlogged`]).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct JobEvent {
    /// The job's id; empty when the request was refused before it became a job.
    pub job_id: String,
    /// Position in the job's stream, from 1; replay and live delivery never repeat a number. 0: an error
    /// of the stream that is no part of the job's log.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    Status {
        status: JobStatus,
    },
    Log {
        message: String,
    },
    /// A denoising step of a generation, or an optimizer step of a training run.
    Step {
        step: u32,
        total: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss: Option<f32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        learning_rate: Option<f64>,
        /// Training: the mean duration of recent steps, in seconds (the inverse of the throughput).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seconds_per_step: Option<f64>,
        /// Training: the estimated seconds left at that pace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eta_seconds: Option<f64>,
        /// A small base64 PNG of the current latent (generation only; live streams only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        preview: Option<String>,
        /// Which image of a request for several the preview is of (from 0); each step then sends
        /// one event per image. Absent for a single image.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<u32>,
    },
    /// A sample image made during training, downloadable at `url`; its PNG carries `recipe` too.
    Sample {
        step: u32,
        url: String,
        /// What drew it: the sample prompt, seed, steps, guidance, size, the base model, and the run's
        /// LoRA as it was at `step`. Absent in events of older versions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recipe: Option<Box<crate::Recipe>>,
    },
    /// The finished generation: the `/generate/` response's fields beside the event's own; its `job_id` is
    /// the event's (JSON keeps one key of a name).
    Result(#[serde(with = "result_fields")] Box<GenerateResponse>),
    Error {
        error: ErrorDetail,
    },
}

impl JobEvent {
    /// An error that is no event of a job's log: a generation request refused before it was queued
    /// (`job_id` empty), or a stream that could not read its job's log.
    pub fn unlogged(job_id: impl Into<String>, error: ErrorDetail, at: i64) -> JobEvent {
        JobEvent {
            job_id: job_id.into(),
            seq: 0,
            at,
            body: EventBody::Error { error },
        }
    }
}

impl<'de> Deserialize<'de> for JobEvent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            job_id: String,
            seq: u64,
            at: i64,
            #[serde(flatten)]
            body: EventBody,
        }
        let Wire {
            job_id,
            seq,
            at,
            mut body,
        } = Wire::deserialize(deserializer)?;
        if let EventBody::Result(response) = &mut body {
            response.job_id.clone_from(&job_id);
        }
        Ok(JobEvent {
            job_id,
            seq,
            at,
            body,
        })
    }
}

/// A result's fields without `job_id`, which the enclosing [`JobEvent`] carries and restores.
mod result_fields {
    use serde::de::Error as _;
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::GenerateResponse;

    pub fn serialize<S: Serializer>(
        response: &GenerateResponse,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut fields = serde_json::to_value(response).map_err(S::Error::custom)?;
        if let Some(map) = fields.as_object_mut() {
            map.remove("job_id");
        }
        fields.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Box<GenerateResponse>, D::Error> {
        let mut fields = serde_json::Value::deserialize(deserializer)?;
        if let Some(map) = fields.as_object_mut() {
            map.entry("job_id").or_insert_with(|| "".into());
        }
        serde_json::from_value(fields)
            .map(Box::new)
            .map_err(D::Error::custom)
    }
}

impl EventBody {
    /// What the job's log keeps of this event: previews and result images are large and live elsewhere
    /// (the result PNG under `/images/`), so they are left out; the rest is kept as sent.
    pub fn for_log(&self) -> Option<EventBody> {
        match self {
            EventBody::Result(_) => None,
            EventBody::Step { .. } => {
                let mut kept = self.clone();
                if let EventBody::Step { preview, .. } = &mut kept {
                    *preview = None;
                }
                Some(kept)
            }
            other => Some(other.clone()),
        }
    }
}

/// What a client may send on the generation WebSocket after its request: `{"type": "cancel"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Cancel,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_flat_with_a_type_tag() {
        let event = JobEvent {
            job_id: "j".into(),
            seq: 3,
            at: 1,
            body: EventBody::Step {
                step: 2,
                total: 4,
                loss: None,
                learning_rate: None,
                seconds_per_step: None,
                eta_seconds: None,
                preview: Some("x".into()),
                image: None,
            },
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "step");
        assert_eq!(json["step"], 2);
        assert_eq!(json["preview"], "x");
        assert_eq!(serde_json::from_value::<JobEvent>(json).unwrap(), event);
        let logged = event.body.for_log().unwrap();
        assert!(matches!(logged, EventBody::Step { preview: None, .. }));
    }

    #[test]
    fn a_result_event_has_one_job_id_and_reads_back_whole() {
        let response = GenerateResponse {
            image: "png".into(),
            seed: 7,
            width: 64,
            height: 64,
            steps: 2,
            model: "m".into(),
            prompt: "a fox".into(),
            elapsed_ms: 5,
            job_id: "job-1".into(),
            loras: Vec::new(),
            images: Vec::new(),
            step_cache: None,
            recipe: None,
        };
        let event = JobEvent {
            job_id: "job-1".into(),
            seq: 9,
            at: 1,
            body: EventBody::Result(Box::new(response.clone())),
        };
        let text = serde_json::to_string(&event).unwrap();
        assert_eq!(text.matches("\"job_id\"").count(), 1, "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["type"], "result");
        // The same fields as `/generate/` answers, so a client may read the response from the event alone.
        assert_eq!(
            serde_json::from_value::<GenerateResponse>(value).unwrap(),
            response
        );
        assert_eq!(serde_json::from_str::<JobEvent>(&text).unwrap(), event);
    }
}
