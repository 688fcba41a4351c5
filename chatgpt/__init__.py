"""chatgpt-api: a lightweight backend for the WeChat ChatGPT mini-program, curl and OpenAI SDKs."""
