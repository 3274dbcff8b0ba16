"""Sender authentication of inbound MX mail: SPF, DKIM and DMARC (issue 15).

Self-contained: it imports nothing from the runtime, the handlers or storage; the
session drives it (see ``Check`` for when to call what) and turns a refusing
``Verdict`` into ``550 5.7.1``.

Libraries, and why each:

- dnspython (already a dependency): its asynchronous resolver runs natively on Trio
  and its ``LRUCache`` honours TTLs, so lookups need no thread and the cache is bounded.
- pyspf (``spf``): the reference Python SPF implementation (RFC 7208 test suite, used
  by pypolicyd-spf and authheaders), including the 10-lookup, 2-void-lookup and 10
  MX/PTR limits. Synchronous, so it runs in a worker thread with its DNS hook routed
  back into Trio.
- dkimpy (``dkim``) with PyNaCl: RFC 6376 message, signature and key-record parsing and
  canonicalization for rsa-sha256 and RFC 8463 ed25519-sha256, maintained with pyspf
  and authres by the same people. Its parse / key / crypto steps are public, so keys
  are fetched on Trio in parallel and temperror is told apart from permerror.
- cryptography (already a dependency): the RSA and Ed25519 signature checks in OpenSSL,
  instead of dkimpy's pure-Python RSA (about ten times the CPU per message).
- dmarc (pydmarc, MIT, no required dependencies): RFC 7489 record parsing, alignment and
  the ``p=``/``sp=`` choice, with no I/O of its own. Chosen over authheaders, which
  checks only the first DKIM signature, ignores ``pct``, reads its 2019 PSL file on
  every call and cannot tell a DNS failure from a missing record; and over checkdmarc,
  a domain-auditing tool with heavy dependencies that makes DNS queries while parsing.
- publicsuffixlist: a Public Suffix List packaged inside the wheel and updated with
  each release (publicsuffix2's copy dates from 2019); nothing is fetched at run time.
- authres: RFC 8601 ``Authentication-Results`` rendering and quoting.
"""

from ._check import Check, SenderAuthenticator
from ._dkim import verify_standalone
from ._resolver import DnsTemporaryError, Resolver
from ._results import Disposition, DkimOutcome, DmarcOutcome, Result, SpfOutcome, Verdict
from ._settings import Mode, NameServer, SenderAuthSettings, parse_name_servers

__all__ = [
    "Check",
    "Disposition",
    "DkimOutcome",
    "DmarcOutcome",
    "DnsTemporaryError",
    "Mode",
    "NameServer",
    "Resolver",
    "Result",
    "SenderAuthSettings",
    "SenderAuthenticator",
    "SpfOutcome",
    "Verdict",
    "parse_name_servers",
    "verify_standalone",
]
