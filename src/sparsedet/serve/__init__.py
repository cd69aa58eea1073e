"""``sparsedet serve``: detection over HTTP (``app.create_app``), with dynamic batching
(``batcher``), input limits (``inputs``) and a web page (``static/``)."""
