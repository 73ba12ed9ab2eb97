//! Hugging Face Hub access: local cache first, offline-aware, downloads with progress.
