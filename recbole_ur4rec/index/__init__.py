"""Indexes over learned representations: the FAISS retrieval memory of FTRagRec."""
