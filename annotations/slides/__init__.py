"""Slides, from the uploaded file to the pixels a viewer sees. A subpackage of the annotations app
(the models stay in annotations/models.py):

- ``ingest``: name and format checks, the streaming upload, file inspection, ``add_slide`` and the
  ingest task's body (metadata, thumbnail, tissue, patch grid).
- ``media``: where a slide's files live under MEDIA_ROOT (unique paths, stored on the row) and when
  they may be deleted.
- ``tasks``: the ``annotations.tasks.ingest_slide`` Celery task (``cpu`` queue).
- ``tiles``: reading pixels: tile sources, tiles (stored JPEG passed through, rendered ones in a
  shared Redis cache keyed by the file's checksum), thumbnails, regions, patches.
- ``access``: who may see a slide's or patch's pixels, and the per-credential cache of it.
- ``lean``: the tile route in front of Django (histoloop/asgi.py) for credentials the view has
  already authorised.
- ``views``, ``urls``, ``serializers``: the HTTP endpoints (the upload page's route is in frontend/urls.py).
"""
