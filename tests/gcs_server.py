"""A local Google Cloud Storage server for the tests: gcp-storage-emulator, made stricter.

    python tests/gcs_server.py --port 9023 --bucket bkt

The emulator (PyPI ``gcp-storage-emulator``) speaks the JSON API that gcsfs, the Google clients and
tensorstore use, but leaves out two parts of GCS that Orbax and the workdir lock rely on, added
here before its handlers are registered:

- downloads carry ``x-goog-generation`` (tensorstore's OCDBT driver reads a manifest's generation
  from it, and fails with "Malformed StorageGeneration" without it);
- the generation preconditions ``ifGenerationMatch`` / ``ifGenerationNotMatch`` on reads (412 /
  304) and ``ifGenerationMatch`` on uploads (412; ``0`` means "only if absent", the lock's
  exclusive create).
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from http import HTTPStatus


def _generation(storage, bucket: str, name: str) -> str | None:
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return None


def _upload_name(request) -> str | None:
  if request.query.get("name"):
    return request.query["name"][0]
  match = re.search(rb'"name"\s*:\s*"([^"]+)"', request.data or b"")
  return json.loads(b'"' + match.group(1) + b'"') if match else None


def _patch() -> None:
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download, insert = objects.download, objects.insert

  def checked_download(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    generation = _generation(storage, bucket, name)
    if generation is not None:
      match = request.query.get("ifGenerationMatch")
      not_match = request.query.get("ifGenerationNotMatch")
      if match and match[0] != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
      if not_match and not_match[0] == generation:
        response.status = HTTPStatus.NOT_MODIFIED
        return None
      response["x-goog-generation"] = generation
      response["x-goog-metageneration"] = "1"
    return download(request, response, storage, *args, **kwargs)

  def checked_insert(request, response, storage, *args, **kwargs):
    match = request.query.get("ifGenerationMatch")
    if match and "upload_id" not in request.query:
      name = _upload_name(request)
      current = _generation(storage, request.params["bucket_name"], name) if name else None
      if (current or "0") != match[0]:
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "Precondition Failed"}})
        return None
    return insert(request, response, storage, *args, **kwargs)

  objects.download, objects.insert = checked_download, checked_insert


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--bucket", default="bkt")
  args = parser.parse_args(argv)
  _patch()
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  server = create_server("127.0.0.1", args.port, in_memory=True, default_bucket=args.bucket)
  server.start()
  print(f"gcs_server: listening on 127.0.0.1:{args.port}", flush=True)
  threading.Event().wait()  # serves until the process is terminated


if __name__ == "__main__":
  main()
