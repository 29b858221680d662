"""``gradfence serve``: a sentiment-analysis HTTP service with scoped inference.

The model runs in dedicated workers (model processes by default), each holding its own
``gf.inference(model)`` (grad mode is thread-local), fed by a dynamic batcher. Heavy
imports live in the submodules:

* :mod:`gradfence.serve.model`: the embedded default model (``load_default()``),
  ``--model-dir`` checkpoints, the held-out tweets (``heldout_dataset()``);
* :mod:`gradfence.serve.batcher`: the dynamic batcher and its workers;
  :mod:`gradfence.serve.processes`: the model processes;
* :mod:`gradfence.serve.app`: the FastAPI app; :mod:`gradfence.serve.server`: uvicorn;
* :mod:`gradfence.serve.ray`: the same app on Ray Serve (``serve.ingress``).
"""
