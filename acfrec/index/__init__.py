"""Top-k item retrieval for serving: FAISS exact, IVF and HNSW inner-product indexes."""

from acfrec.index.faiss_index import IndexConfig, ItemIndex, gpu_count
from acfrec.index.synthetic import clustered_vectors
from acfrec.index.vectors import augment_bias, model_vectors

__all__ = ["IndexConfig", "ItemIndex", "augment_bias", "clustered_vectors", "gpu_count", "model_vectors"]
