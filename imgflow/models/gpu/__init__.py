"""The production (GPU) profile: real models from paths the user configures.

| job | adapter | loads |
|---|---|---|
| describe, read_text | ``vlm.Qwen2VlDescriber`` / ``vlm.Qwen2VlTextReader`` | one Qwen2-VL load (transformers folder, ``models.vlm``), shared; two prompts |
| embed_image | ``clip.OpenClipImageEmbedder`` | open_clip model name (or config .json) + weights file (``models.clip``) |
| embed_text | ``sentence.SentenceTransformerEmbedder`` | SentenceTransformer folder (``models.sentence``) |
| word_vectors | ``word_vectors.GensimWordVectorizer`` | FastText .bin / word2vec .bin/.txt / gensim KeyedVectors (``models.word_vectors``) |
| structure_text | ``imgflow.models.llm.production.GgufStructurer`` | any GGUF (Llama-3.1-8B-Instruct) via llama-cpp-python (``models.llm``) |

Nothing here downloads: every load is from a local path with ``local_files_only``.
"""
