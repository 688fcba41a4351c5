"""Every user-facing text in one table, so an operator can change them in one place."""
from __future__ import annotations

# Texts the mini-program shows as they are (PROTOCOL.md A.1, A.3); keep the wording.
SUCCESS = "SUCCESS"
BODY_EMPTY = "Parameter conversion failed, JSON is empty."
BODY_NOT_JSON = "Parameter conversion failed, JSON is not valid."
API_KEY_BLANK = "apiKey不能为空!"
MESSAGES_EMPTY = "message列表不能为空!"
API_KEY_WRONG = "API Key不正确!"
ACCOUNT_BANNED = "账号已被封禁!"
SERVICE_ERROR = "服务异常!"
HTTP_TOO_FAST = "访问频繁, 请稍后再试!"
MAINTENANCE = "服务正在维护~"
AUTHORIZATION_NULL = "Authorization is null!"

# Websocket refusals and failures.
WS_TOO_FAST = "请求频繁!"
QUOTA_USED_UP = "今天请求已达最大限制数。"
UPSTREAM_FAILED = "服务出错, 请稍后再试!"
UPSTREAM_UNREACHABLE = "服务器网络开小差了, 请稍后再试~"
UPSTREAM_TIMEOUT = "服务响应超时, 请稍后再试!"
THINKING = "思考中…"  # the first line of the quote a websocket bubble shows while the model reasons
FRAME_NOT_JSON = "消息格式不正确: 需要一个JSON对象。"
FRAME_BAD_FIELD = "消息格式不正确: 字段 {field} 的类型错误。"
TOKEN_MODE_GONE = "Token登录方式已停用, 请使用API Key。"
PROMPT_TOO_LONG = "问题太长了, 请缩短后再试。"
BUSY = "上一个问题还在回答中, 请稍后再试。"
SHUTTING_DOWN = "服务器正在重启, 请稍后再试~"  # PROTOCOL.md E.3
ANSWER_TOO_LONG = "回答超出长度限制, 已停止。"
PROMPT_EMPTY = "请输入图片描述。"
NO_SERVER_KEY = "服务器未配置API Key, 请使用自己的API Key。"
SERVER_BUSY = "服务繁忙, 请稍后再试~"  # every pool key cooling (E.1), or the shared quota unreachable (E.6)
MODEL_NOT_FOUND = "模型 {model} 不可用, 请换一个模型。"
NO_IMAGES = "这台服务器不提供图片生成。"

# Content safety (PROTOCOL.md E.5).
CONTENT_SENSITIVE = "内容包含敏感词, 请修改后再试"  # a prompt with a listed word, or one WeChat judged risky
CONTENT_BLOCKED = "内容不合规, 已被屏蔽"  # an answer stopped for its content
CONTENT_UNCHECKED = "内容安全检查失败, 请稍后再试"  # WeChat could not check it and wechat.fail_open is off
LOGIN_EXPIRED = "登录已过期, 请重新登录"  # a websocket frame's login token is invalid or expired

# Obsolete ChatGPT web login (PROTOCOL.md C.1).
LOGIN_GONE = "账号密码和Token登录已停用, 请使用API Key登录。"
TOKEN_UNSUPPORTED = "Token模式已停用, 该接口不再支持, 请使用API Key。"

# The built-in offline provider's answer (no upstream key configured).
OFFLINE_ANSWER = (
    "**离线模式 / Offline mode.** 这台服务器还没有配置 OpenAI API Key, 所以这不是模型的回答。"
    "This server has no upstream API key configured, so this is a canned answer, not a model's. "
    "The operator can set `OPENAI_API_KEY` (and optionally `OPENAI_BASE_URL`) and restart."
)

# Prompt that asks for the remaining daily quota instead of an answer (PROTOCOL.md A.5).
QUOTA_QUERY = "查询次数"

# What the upstream reader says of a failure, in English: in the log line, and for a timeout also to
# SDK and curl users (which limit ran out). Never a key: only the upstream's host.
EN_UPSTREAM_TIMEOUT = "The upstream did not answer in time."
EN_UNREACHABLE = "Could not reach the upstream {host} ({cause})."
EN_READ_TIMEOUT = "The upstream {host} sent no answer event for {seconds:g} s (upstream.read_timeout)."
EN_ANSWER_TIMEOUT = "The upstream {host} took longer than {seconds:g} s for one answer (upstream.answer_timeout)."
EN_BROKEN = "The upstream {host} broke off its answer: {cause}."
