"""``gradfence serve``: a sentiment-analysis HTTP service with scoped inference.

The model runs in one dedicated thread that holds ``gf.inference(model)`` (grad mode is
thread-local), fed by a dynamic batcher. Heavy imports live in the submodules:

* :mod:`gradfence.serve.model`: the embedded default model (``load_default()``),
  ``--model-dir`` checkpoints, the held-out tweets (``heldout_dataset()``);
* :mod:`gradfence.serve.batcher`: the dynamic batcher and its inference thread;
* :mod:`gradfence.serve.app`: the FastAPI app; :mod:`gradfence.serve.server`: uvicorn;
* :mod:`gradfence.serve.ray`: the same app on Ray Serve (``serve.ingress``).
"""
