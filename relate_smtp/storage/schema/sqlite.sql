-- The Relate tables the SMTP host uses (SPEC §8), for the embedded SQLite store.
--
-- Same table and column names as the platform's EF Core migrations. Types map as:
-- uuid -> TEXT (canonical lower-case form), timestamptz -> TEXT (ISO-8601 UTC with
-- microseconds, so text order is time order), bool -> INTEGER 0/1, bytea -> BLOB,
-- varchar(n) -> VARCHAR(n) (TEXT affinity; the length documents the column, callers
-- truncate). Idempotent: it never drops or alters a table it finds.

CREATE TABLE IF NOT EXISTS "Users" (
    "Id" TEXT NOT NULL PRIMARY KEY,
    "OidcSubject" VARCHAR(500) NOT NULL,
    "OidcIssuer" VARCHAR(500) NOT NULL,
    "Email" VARCHAR(320) NOT NULL,
    "DisplayName" VARCHAR(500) NULL,
    "CreatedAt" TEXT NOT NULL,
    "LastLoginAt" TEXT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS "IX_Users_OidcIssuer_OidcSubject"
    ON "Users" ("OidcIssuer", "OidcSubject");
CREATE INDEX IF NOT EXISTS "IX_Users_Email" ON "Users" ("Email");
-- Address lookups are case-insensitive (SPEC §3, §4); queries use lower("Email").
CREATE INDEX IF NOT EXISTS "IX_Users_Email_Lower" ON "Users" (lower("Email"));

CREATE TABLE IF NOT EXISTS "UserEmailAddresses" (
    "Id" TEXT NOT NULL PRIMARY KEY,
    "UserId" TEXT NOT NULL REFERENCES "Users" ("Id") ON DELETE CASCADE,
    "Address" VARCHAR(320) NOT NULL,
    "IsVerified" INTEGER NOT NULL DEFAULT 0,
    "AddedAt" TEXT NOT NULL,
    "VerificationToken" VARCHAR NULL,
    "VerificationTokenExpiresAt" TEXT NULL
);
CREATE INDEX IF NOT EXISTS "IX_UserEmailAddresses_UserId" ON "UserEmailAddresses" ("UserId");
CREATE INDEX IF NOT EXISTS "IX_UserEmailAddresses_Address_Lower"
    ON "UserEmailAddresses" (lower("Address"));

CREATE TABLE IF NOT EXISTS "SmtpApiKeys" (
    "Id" TEXT NOT NULL PRIMARY KEY,
    "UserId" TEXT NOT NULL REFERENCES "Users" ("Id") ON DELETE CASCADE,
    "Name" VARCHAR(100) NOT NULL,
    "KeyHash" VARCHAR(128) NOT NULL,
    "KeyPrefix" VARCHAR NULL,
    "Scopes" VARCHAR(500) NOT NULL DEFAULT '[]',
    "CreatedAt" TEXT NOT NULL,
    "LastUsedAt" TEXT NULL,
    "RevokedAt" TEXT NULL
);
CREATE INDEX IF NOT EXISTS "IX_SmtpApiKeys_UserId" ON "SmtpApiKeys" ("UserId");
CREATE INDEX IF NOT EXISTS "IX_SmtpApiKeys_RevokedAt" ON "SmtpApiKeys" ("RevokedAt");
CREATE INDEX IF NOT EXISTS "IX_SmtpApiKeys_KeyPrefix_RevokedAt"
    ON "SmtpApiKeys" ("KeyPrefix", "RevokedAt");

CREATE TABLE IF NOT EXISTS "Emails" (
    "Id" TEXT NOT NULL PRIMARY KEY,
    "MessageId" VARCHAR(500) NOT NULL,
    "FromAddress" VARCHAR(320) NOT NULL,
    "FromDisplayName" VARCHAR(500) NULL,
    "Subject" VARCHAR(1000) NOT NULL,
    "TextBody" TEXT NULL,
    "HtmlBody" TEXT NULL,
    "ReceivedAt" TEXT NOT NULL,
    "SizeBytes" INTEGER NOT NULL,
    "InReplyTo" VARCHAR(500) NULL,
    "References" VARCHAR(2000) NULL,
    "ThreadId" TEXT NULL,
    "SentByUserId" TEXT NULL
);
CREATE INDEX IF NOT EXISTS "IX_Emails_MessageId" ON "Emails" ("MessageId");
CREATE INDEX IF NOT EXISTS "IX_Emails_ReceivedAt" ON "Emails" ("ReceivedAt");
CREATE INDEX IF NOT EXISTS "IX_Emails_ThreadId" ON "Emails" ("ThreadId");

CREATE TABLE IF NOT EXISTS "EmailRecipients" (
    "Id" TEXT NOT NULL PRIMARY KEY,
    "EmailId" TEXT NOT NULL REFERENCES "Emails" ("Id") ON DELETE CASCADE,
    "Address" VARCHAR(320) NOT NULL,
    "DisplayName" VARCHAR(500) NULL,
    "Type" VARCHAR(10) NOT NULL,
    "UserId" TEXT NULL REFERENCES "Users" ("Id") ON DELETE SET NULL,
    "IsRead" INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS "IX_EmailRecipients_Address" ON "EmailRecipients" ("Address");
CREATE INDEX IF NOT EXISTS "IX_EmailRecipients_EmailId" ON "EmailRecipients" ("EmailId");
CREATE INDEX IF NOT EXISTS "IX_EmailRecipients_UserId_IsRead"
    ON "EmailRecipients" ("UserId", "IsRead");

CREATE TABLE IF NOT EXISTS "EmailAttachments" (
    "Id" TEXT NOT NULL PRIMARY KEY,
    "EmailId" TEXT NOT NULL REFERENCES "Emails" ("Id") ON DELETE CASCADE,
    "FileName" VARCHAR(500) NOT NULL,
    "ContentType" VARCHAR(200) NOT NULL,
    "SizeBytes" INTEGER NOT NULL,
    "Content" BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS "IX_EmailAttachments_EmailId" ON "EmailAttachments" ("EmailId");
