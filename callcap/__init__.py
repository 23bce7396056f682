"""callcap: a passive SIP/RTP call recorder.

The import package is assembled from sibling folders (see pyproject.toml):
``callcap.capture`` (packets, SIP, SDP, dialogs, RTP streams), ``callcap.codecs``
(G.711, DTMF), ``callcap.storage`` (WAV, sidecar, layout) and ``callcap.config``.
This module stays import-light on purpose: every subpackage imports it first.
"""

__version__ = "0.1.0"
