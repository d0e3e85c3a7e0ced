//! The inference handle used by the HTTP layer. [`Infer`] is cheap to clone: it limits the requests in
//! flight (a semaphore, refusing at once when full) and hands validated requests to the batching task
//! (`scheduler`) over a channel. Each request gets back a stream of [`InferStreamResponse`]s; dropping
//! that stream (the client went away) cancels the request at the batching task's next step.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::adapters::AdapterError;
use crate::stopping::FinishReason;
use crate::validation::ValidRequest;

/// Errors of the inference layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    /// Too many requests in flight (429).
    #[error("Model is overloaded")]
    Overloaded,
    /// A shard failed while this request was in its batch (424).
    #[error("Request failed during generation: {0}")]
    Generation(String),
    /// The request's adapter could not be downloaded or loaded (4xx by the shard's code).
    #[error("{0}")]
    Adapter(AdapterError),
    /// The batching task is gone (503).
    #[error("the batching task has stopped")]
    Unavailable,
    /// The stream ended without a final token (500).
    #[error("Incomplete generation")]
    IncompleteGeneration,
}

/// A token with its text.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    /// Token id.
    pub id: u32,
    /// Text (for generated tokens: the text this token completed).
    pub text: String,
    /// Log-probability (NaN when undefined).
    pub logprob: f32,
    /// Whether it is a special token.
    pub special: bool,
    /// For a generated special token: the leading bytes of `text` that were held back before it (an
    /// incomplete character) and belong to the generated text, as a one-shot decode that skips special
    /// tokens keeps them; 0 otherwise.
    pub held: usize,
}

impl TokenInfo {
    /// The part of `text` that belongs to the generated text: all of it for a plain token, the held
    /// bytes for a special one.
    pub fn plain_text(&self) -> &str {
        if self.special {
            &self.text[..self.held]
        } else {
            &self.text
        }
    }
}

/// The final answer of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    /// The whole generated text (without the prompt).
    pub text: String,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// The sampler's seed, when sampling.
    pub seed: Option<u64>,
}

/// One message of a request's response stream.
#[derive(Debug, Clone)]
pub enum InferStreamResponse {
    /// Prompt tokens with log-probabilities and alternatives (only with `decoder_input_details`; alternatives
    /// with `prefill_top_n`), before any token.
    Prefill(Vec<(TokenInfo, Vec<TokenInfo>)>),
    /// A generated token that did not end the sequence.
    Intermediate {
        /// The token.
        token: TokenInfo,
        /// Its alternatives.
        top_tokens: Vec<TokenInfo>,
    },
    /// The last token, with the final text.
    End {
        /// The token.
        token: TokenInfo,
        /// Its alternatives.
        top_tokens: Vec<TokenInfo>,
        /// The final text and why it stopped.
        generated_text: GeneratedText,
        /// When the request was queued.
        queued: Instant,
        /// When it joined the batch.
        start: Instant,
    },
}

/// A request's stream of responses (ends after `End` or an error).
pub type ResponseReceiver = mpsc::UnboundedReceiver<Result<InferStreamResponse, InferError>>;
/// The batching task's side of a request's stream.
pub type ResponseSender = mpsc::UnboundedSender<Result<InferStreamResponse, InferError>>;

/// A queued request.
#[derive(Debug)]
pub struct Entry {
    /// The validated request.
    pub request: ValidRequest,
    /// Where its responses go; closed when the client is gone.
    pub response_tx: ResponseSender,
    /// When it was queued.
    pub queued: Instant,
    /// The request's tracing span.
    pub span: tracing::Span,
    /// A stream waiting to send its headers ([`Pending::ready`]): told once the request's adapter is
    /// downloaded and checked (the base model's at once); `None` for other requests.
    pub ready: Option<oneshot::Sender<()>>,
}

impl Entry {
    /// Tells a waiting stream that its request's adapter is checked (once; later calls do nothing).
    pub fn ready(&mut self) {
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(());
        }
    }
}

/// The longest a stream's headers wait for its adapter ([`Pending::ready`]).
pub const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A queued stream whose headers wait for its adapter, so that a missing, forbidden or invalid adapter is
/// an HTTP (or gRPC) error rather than an error event after a 200.
#[derive(Debug)]
pub struct Pending {
    receiver: ResponseReceiver,
    ready: oneshot::Receiver<()>,
}

impl Pending {
    /// The response stream once the request's adapter is downloaded and checked (at once for the base
    /// model or an adapter already checked), or the error that failed the request before that. After
    /// [`READY_WAIT`] the stream starts anyway, so that a slow download sends headers and keep-alives
    /// before a proxy's idle timeout; a failure after that is an error event.
    pub async fn ready(mut self) -> Result<ResponseReceiver, InferError> {
        match tokio::time::timeout(READY_WAIT, &mut self.ready).await {
            Ok(Ok(())) | Err(_) => return Ok(self.receiver),
            Ok(Err(_)) => {}
        }
        // The batching task dropped the request without telling: its failure is on the stream (the
        // scheduler tells every request before its first token).
        match self.receiver.recv().await {
            Some(Err(e)) => Err(e),
            _ => Err(InferError::IncompleteGeneration),
        }
    }
}

/// A whole generation, collected from the stream.
#[derive(Debug, Clone)]
pub struct InferResponse {
    /// Prompt tokens and their alternatives (with `decoder_input_details`; alternatives with `prefill_top_n`).
    pub prefill: Vec<(TokenInfo, Vec<TokenInfo>)>,
    /// Generated tokens with their alternatives.
    pub tokens: Vec<(TokenInfo, Vec<TokenInfo>)>,
    /// The final text.
    pub generated_text: GeneratedText,
    /// When the request was queued.
    pub queued: Instant,
    /// When it joined the batch.
    pub start: Instant,
}

/// Handle to the batching task.
#[derive(Debug, Clone)]
pub struct Infer {
    entries: mpsc::UnboundedSender<Entry>,
    limit: Arc<Semaphore>,
}

impl Infer {
    /// A handle sending to `entries` and allowing `max_concurrent_requests` requests in flight.
    pub fn new(entries: mpsc::UnboundedSender<Entry>, max_concurrent_requests: usize) -> Self {
        Self {
            entries,
            limit: Arc::new(Semaphore::new(max_concurrent_requests)),
        }
    }

    /// Takes a slot for one request, or fails at once with `Overloaded`. Hold the permit until the
    /// response is complete.
    pub fn acquire(&self) -> Result<OwnedSemaphorePermit, InferError> {
        Arc::clone(&self.limit)
            .try_acquire_owned()
            .map_err(|_| InferError::Overloaded)
    }

    /// Queues `request` and returns its response stream.
    pub fn generate_stream(&self, request: ValidRequest) -> Result<ResponseReceiver, InferError> {
        self.queue(request, None)
    }

    /// Queues `request` for a stream whose headers wait for its adapter ([`Pending::ready`]).
    pub fn queue_stream(&self, request: ValidRequest) -> Result<Pending, InferError> {
        let (ready_tx, ready) = oneshot::channel();
        let receiver = self.queue(request, Some(ready_tx))?;
        Ok(Pending { receiver, ready })
    }

    fn queue(&self, request: ValidRequest, ready: Option<oneshot::Sender<()>>) -> Result<ResponseReceiver, InferError> {
        let (response_tx, response_rx) = mpsc::unbounded_channel();
        let entry = Entry {
            request,
            response_tx,
            queued: Instant::now(),
            span: tracing::Span::current(),
            ready,
        };
        self.entries.send(entry).map_err(|_| InferError::Unavailable)?;
        Ok(response_rx)
    }

    /// Queues `request` and waits for the whole generation.
    pub async fn generate(&self, request: ValidRequest) -> Result<InferResponse, InferError> {
        collect(self.generate_stream(request)?).await
    }
}

/// Collects a whole generation from a response stream.
pub async fn collect(mut stream: ResponseReceiver) -> Result<InferResponse, InferError> {
    {
        let mut prefill = Vec::new();
        let mut tokens = Vec::new();
        while let Some(message) = stream.recv().await {
            match message? {
                InferStreamResponse::Prefill(p) => prefill = p,
                InferStreamResponse::Intermediate { token, top_tokens } => tokens.push((token, top_tokens)),
                InferStreamResponse::End {
                    token,
                    top_tokens,
                    generated_text,
                    queued,
                    start,
                } => {
                    tokens.push((token, top_tokens));
                    return Ok(InferResponse {
                        prefill,
                        tokens,
                        generated_text,
                        queued,
                        start,
                    });
                }
            }
        }
        Err(InferError::IncompleteGeneration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> (Pending, ResponseSender, oneshot::Sender<()>) {
        let (response_tx, receiver) = mpsc::unbounded_channel();
        let (ready_tx, ready) = oneshot::channel();
        (Pending { receiver, ready }, response_tx, ready_tx)
    }

    #[tokio::test]
    async fn a_told_stream_starts_and_a_failed_one_is_its_error() {
        let (p, _tx, ready) = pending();
        ready.send(()).expect("waiting");
        assert!(p.ready().await.is_ok());

        // The scheduler fails the request: the error first, then the entry (and its sender) is dropped.
        let (p, tx, ready) = pending();
        tx.send(Err(InferError::Overloaded)).expect("open");
        drop(ready);
        assert!(matches!(p.ready().await, Err(InferError::Overloaded)));

        let (p, tx, ready) = pending();
        drop((tx, ready));
        assert!(matches!(p.ready().await, Err(InferError::IncompleteGeneration)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_adapter_starts_the_stream_after_the_wait() {
        let (p, tx, _ready) = pending();
        let start = tokio::time::Instant::now();
        let mut receiver = p.ready().await.expect("started anyway");
        assert_eq!(start.elapsed(), READY_WAIT);
        // A later failure reaches the stream.
        tx.send(Err(InferError::Unavailable)).expect("open");
        assert!(matches!(receiver.recv().await, Some(Err(InferError::Unavailable))));
    }
}
