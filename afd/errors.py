"""The afd exception types: every failure names the field and the rule it broke."""
from __future__ import annotations

# aclnn host-side status codes (aclnn return codes of the real API).
ACLNN_SUCCESS = 0
ACLNN_ERR_PARAM_NULLPTR = 161001
ACLNN_ERR_PARAM_INVALID = 161002
# AICPU kernel status codes (KERNEL_STATUS_* of the CANN AICPU kernels).
KERNEL_STATUS_OK = 0
KERNEL_STATUS_PARAM_INVALID = 1
KERNEL_STATUS_INNER_ERROR = 2


def one_line(text: str) -> str:
    """Text with its control characters escaped (a newline becomes \\n): an error is always one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class AfdError(Exception):
    """Base of every afd error; carries the field, the rule and a status code where one exists."""

    def __init__(self, field: str, rule: str, status: int | None = None):
        field, rule = one_line(str(field)), one_line(str(rule))  # (a key or value from input may hold a newline)
        self.field = field
        self.rule = rule
        self.status = status
        code = f" [status {status}]" if status is not None else ""
        super().__init__(f"{field}: {rule}{code}")


class AclnnError(AfdError):
    """Host-side aclnn parameter check failed (161001 null pointer, 161002 invalid)."""


class KernelError(AfdError):
    """A device-side (kernel or tiling) check failed: KERNEL_STATUS_PARAM_INVALID and friends."""

    def __init__(self, field: str, rule: str, status: int = KERNEL_STATUS_PARAM_INVALID):
        super().__init__(field, rule, status)


class DeviceAddressError(KernelError):
    """A device address that is null, unknown, or out of its allocation's range."""


class ConfigError(AfdError):
    """A configuration value broke a rule; raised before any process starts."""
