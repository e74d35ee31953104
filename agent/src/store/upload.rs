//! Uploads for `release publish --upload s3://bucket/prefix/`: one PUT for
//! a small file, a multipart upload ([`PART_SIZE`] parts) for a large one,
//! then a HEAD that must show the whole size before the caller writes the
//! manifest. Each request is retried on throttling, 5xx, network errors
//! and expired credentials.
//!
//! Crash guarantees: the manifest is written only after every object was
//! verified, so a failure or crash part-way leaves no manifest naming a
//! missing object. A failed multipart upload is aborted (best effort); one
//! left by a crash is invisible (no object) until the bucket's lifecycle
//! rule for incomplete uploads removes its parts.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::pacing::{Backoff, BackoffState};

use super::{Action, ObjectUrl, Signed, Store, Verdict};

/// Files larger than this go up in parts of this size (S3's minimum part
/// is 5 MiB; 16 MiB keeps a 2 GB build under 130 parts and each part's
/// buffer small).
pub const PART_SIZE: u64 = 16 << 20;

/// Tries per request before the upload fails.
const TRIES: u32 = 5;

const UPLOAD_BACKOFF: Backoff = Backoff {
    initial: std::time::Duration::from_millis(200),
    max: std::time::Duration::from_secs(5),
};

/// One request to send: method, body, and how to sign it.
struct Request<'a> {
    object: &'a ObjectUrl,
    action: Action,
    method: reqwest::Method,
    body: Option<bytes::Bytes>,
    /// Builds the presigned URL from the bucket, the current keys and the key.
    sign: &'a (dyn Fn(&rusty_s3::Bucket, &rusty_s3::Credentials, &str) -> reqwest::Url + Sync),
}

impl<'a> Request<'a> {
    /// A request on `object`; a HEAD needs s3:GetObject, the rest s3:PutObject.
    fn new(
        object: &'a ObjectUrl,
        method: reqwest::Method,
        body: Option<bytes::Bytes>,
        sign: &'a (dyn Fn(&rusty_s3::Bucket, &rusty_s3::Credentials, &str) -> reqwest::Url + Sync),
    ) -> Request<'a> {
        let action = if method == reqwest::Method::HEAD {
            Action::Head
        } else {
            Action::Put
        };
        Request {
            object,
            action,
            method,
            body,
            sign,
        }
    }
}

/// Uploads `path` to `object` and checks with a HEAD that the store holds
/// all of its `size` bytes.
pub async fn upload_file(
    store: &Store,
    http: &reqwest::Client,
    path: &Path,
    object: &ObjectUrl,
) -> Result<()> {
    let file = Arc::new(std::fs::File::open(path).map_err(|e| Error::io(path, e))?);
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if size <= PART_SIZE {
        let body = read_at(&file, path, 0, size).await?;
        send(
            store,
            http,
            Request::new(object, reqwest::Method::PUT, Some(body), &|b, c, k| {
                use rusty_s3::S3Action;
                b.put_object(Some(c), k).sign(super::PRESIGN_FOR)
            }),
        )
        .await?;
    } else {
        multipart(store, http, &file, path, size, object).await?;
    }
    verify(store, http, object, size).await?;
    info!(object = %object, bytes = size, "uploaded and verified");
    Ok(())
}

/// Reads `len` bytes at `offset` on the blocking pool.
async fn read_at(
    file: &Arc<std::fs::File>,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<bytes::Bytes> {
    let f = Arc::clone(file);
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset).map(|()| buf)
    })
    .await
    .map_err(|e| Error::Internal(format!("read task failed: {e}")))?;
    read.map(bytes::Bytes::from).map_err(|e| Error::io(path, e))
}

async fn multipart(
    store: &Store,
    http: &reqwest::Client,
    file: &Arc<std::fs::File>,
    path: &Path,
    size: u64,
    object: &ObjectUrl,
) -> Result<()> {
    use rusty_s3::S3Action;
    let created = send(
        store,
        http,
        Request::new(object, reqwest::Method::POST, None, &|b, c, k| {
            b.create_multipart_upload(Some(c), k)
                .sign(super::PRESIGN_FOR)
        }),
    )
    .await?;
    let text = created.text().await.map_err(|e| request_error(object, e))?;
    let upload = rusty_s3::actions::CreateMultipartUpload::parse_response(&text).map_err(|e| {
        Error::StoreRequest {
            object: object.to_string(),
            action: "CreateMultipartUpload",
            reason: format!("unreadable answer: {e}"),
        }
    })?;
    let id = upload.upload_id().to_string();
    let parts = upload_parts(store, http, file, path, size, object, &id).await;
    let completed = match parts {
        Ok(etags) => complete(store, http, object, &id, &etags).await,
        Err(e) => Err(e),
    };
    if let Err(e) = completed {
        warn!(object = %object, error = %e, "upload failed; aborting the multipart upload");
        let aborted = send(
            store,
            http,
            Request::new(object, reqwest::Method::DELETE, None, &|b, c, k| {
                b.abort_multipart_upload(Some(c), k, &id)
                    .sign(super::PRESIGN_FOR)
            }),
        )
        .await;
        if let Err(abort) = aborted {
            warn!(object = %object, error = %abort, "abort failed; a lifecycle rule for incomplete multipart uploads removes the parts");
        }
        return Err(e);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one upload's context, passed flat
async fn upload_parts(
    store: &Store,
    http: &reqwest::Client,
    file: &Arc<std::fs::File>,
    path: &Path,
    size: u64,
    object: &ObjectUrl,
    id: &str,
) -> Result<Vec<String>> {
    use rusty_s3::S3Action;
    let mut etags = Vec::new();
    let mut offset = 0;
    while offset < size {
        let number = u16::try_from(etags.len() + 1).map_err(|_| Error::StoreRequest {
            object: object.to_string(),
            action: "UploadPart",
            reason: "more than 65535 parts".into(),
        })?;
        let len = PART_SIZE.min(size - offset);
        let body = read_at(file, path, offset, len).await?;
        let answer = send(
            store,
            http,
            Request::new(object, reqwest::Method::PUT, Some(body), &|b, c, k| {
                b.upload_part(Some(c), k, number, id)
                    .sign(super::PRESIGN_FOR)
            }),
        )
        .await?;
        let etag = answer
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::StoreRequest {
                object: object.to_string(),
                action: "UploadPart",
                reason: format!("part {number} answered without an ETag"),
            })?;
        etags.push(etag.to_string());
        offset += len;
    }
    Ok(etags)
}

async fn complete(
    store: &Store,
    http: &reqwest::Client,
    object: &ObjectUrl,
    id: &str,
    etags: &[String],
) -> Result<()> {
    use rusty_s3::S3Action;
    let body = {
        // The body only needs the bucket for its type; any bucket does.
        let bucket = store.bucket(object)?;
        rusty_s3::actions::CompleteMultipartUpload::new(
            &bucket,
            None,
            &object.key,
            id,
            etags.iter().map(String::as_str),
        )
        .body()
    };
    let answer = send(
        store,
        http,
        Request::new(
            object,
            reqwest::Method::POST,
            Some(body.into()),
            &|b, c, k| {
                b.complete_multipart_upload(Some(c), k, id, std::iter::empty())
                    .sign(super::PRESIGN_FOR)
            },
        ),
    )
    .await?;
    // S3 may answer 200 with an <Error> body when completing fails late.
    let text = answer.text().await.map_err(|e| request_error(object, e))?;
    if let Some(code) = super::credentials::xml_tag(&text, "Code") {
        return Err(Error::StoreRequest {
            object: object.to_string(),
            action: "CompleteMultipartUpload",
            reason: format!("the store answered {code}"),
        });
    }
    Ok(())
}

/// HEAD: the object must exist with exactly `size` bytes.
async fn verify(
    store: &Store,
    http: &reqwest::Client,
    object: &ObjectUrl,
    size: u64,
) -> Result<()> {
    let answer = send(
        store,
        http,
        Request::new(object, reqwest::Method::HEAD, None, &|b, c, k| {
            use rusty_s3::S3Action;
            b.head_object(Some(c), k).sign(super::PRESIGN_FOR)
        }),
    )
    .await?;
    let stored = answer
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if stored != Some(size) {
        return Err(Error::StoreRequest {
            object: object.to_string(),
            action: "HEAD",
            reason: format!(
                "the store holds {stored:?} bytes after the upload, not {size}; upload again"
            ),
        });
    }
    Ok(())
}

fn request_error(object: &ObjectUrl, e: reqwest::Error) -> Error {
    Error::StoreRequest {
        object: object.to_string(),
        action: "upload",
        reason: e.without_url().to_string(),
    }
}

/// Signs and sends `r`, retrying throttling, 5xx, network errors and
/// expired credentials up to [`TRIES`] times; returns the 2xx answer.
async fn send(store: &Store, http: &reqwest::Client, r: Request<'_>) -> Result<reqwest::Response> {
    let mut backoff = BackoffState::new(UPLOAD_BACKOFF);
    let mut tries = 0;
    loop {
        tries += 1;
        let signed = store.sign_with(r.object, r.sign).await?;
        let mut request = http.request(r.method.clone(), signed.url.clone());
        if let Some(body) = &r.body {
            request = request.body(body.clone());
        }
        let reason = match request.send().await {
            Ok(answer) if answer.status().is_success() => return Ok(answer),
            Ok(answer) => match verdict(store, &r, &signed, answer).await {
                Verdict::Fatal(e) => return Err(e),
                Verdict::Expired(why) | Verdict::Retry(why) => why,
            },
            Err(e) => e.without_url().to_string(),
        };
        if tries >= TRIES {
            return Err(Error::StoreRequest {
                object: r.object.to_string(),
                action: r.action.name(),
                reason: format!("{reason} ({tries} tries)"),
            });
        }
        warn!(object = %r.object, method = %r.method, tries, reason = %reason, "store request failed; retrying");
        tokio::time::sleep(backoff.next_delay(&mut rand::thread_rng())).await;
    }
}

async fn verdict(
    store: &Store,
    r: &Request<'_>,
    signed: &Signed,
    answer: reqwest::Response,
) -> Verdict {
    let status = answer.status().as_u16();
    let region = answer
        .headers()
        .get("x-amz-bucket-region")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = answer.text().await.unwrap_or_default();
    store
        .classify(r.object, r.action, signed, status, region.as_deref(), &body)
        .await
}
